""" Tools built on the library: attention analysis and its figures, benchmarks and operation counts, robustness
evaluation, the T-CNN vs CNN experiment, the relational-shapes data set and the runner of timm's scripts.

Each tool is imported on its own (`timm_tcnn.tools.bench`, ...); several need optional extras. Tools depend on
`weights`, `models`, `layers` and the neutral modules, never on the command line.
"""
