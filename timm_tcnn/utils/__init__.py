""" Neutral helpers any package may use: files and atomic outputs (`io`), Hub availability (`hub`), relative
errors (`numerics`). They import no other part of timm_tcnn but `errors`. """
