""" The experiment's report: `results.json`, `report.md` and figures, from the files its steps wrote.

The headline compares the arms per metric: the mean +- std over seeds of each arm and of the paired
difference (T-CNN minus CNN, same seed), and whether that difference exceeds the spread between seeds:
|mean difference| > 2 x its standard error (std of the paired differences / sqrt(seeds)). With one seed
the spread is unknown and no verdict is given.
"""
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ...utils.io import atomic_write
from .runner import ExperimentState, spec_json
from .spec import ARMS, CHECKPOINTS, ExperimentSpec, run_name

__all__ = ['collect_results', 'compare', 'write_report', 'PAPER_RESNET50RS']

# d'Ascoli et al. 2021: ResNet50-RS fine-tuned 50 epochs on ImageNet-1k, T-CNN minus CNN (top-1 points)
PAPER_RESNET50RS = {'top1': 2.2, 'imagenet_c_accuracy': 11.0}


def _read_json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text(encoding='utf-8')) if path.exists() else None


def read_summary(path: Path) -> List[Dict[str, float]]:
    """train.py's summary.csv as rows of floats (one per epoch)."""
    if not path.exists():
        return []
    with open(path, newline='') as f:
        return [{k: float(v) for k, v in row.items() if v not in ('', None)} for row in csv.DictReader(f)]


def _robustness_metrics(entry: Dict[str, Any]) -> Dict[str, float]:
    summary, metrics = entry['summary'], {}
    for benchmark in ('imagenet-c', 'corrupt'):
        part = summary.get(benchmark)
        if part:
            prefix = 'imagenet_c' if benchmark == 'imagenet-c' else 'corrupted'
            metrics[f'{prefix}_accuracy'] = 100 * part['mean_corruption_accuracy']
            if part.get('clean_accuracy') is not None:
                metrics[f'{prefix}_clean_accuracy'] = 100 * part['clean_accuracy']
            if part.get('mce') is not None:
                metrics['imagenet_c_mce'] = 100 * part['mce']
            for name, value in part['corruptions'].items():
                metrics[f'{prefix}/{name}'] = 100 * value['mean_accuracy']
    for benchmark in ('imagenet-a', 'imagenet-r'):
        if summary.get(benchmark) is not None:
            metrics[benchmark.replace('-', '_') + '_top1'] = 100 * summary[benchmark]
    return metrics


def collect_results(spec: ExperimentSpec) -> Dict[str, Any]:
    """Every number the steps produced: per arm and seed, metrics and the per-epoch validation curve."""
    runs: Dict[str, Dict[str, Any]] = {}
    for seed in spec.seeds:
        robustness = _read_json(spec.root / 'robustness' / f'seed{seed}' / 'robustness.json')
        models = list((robustness or {}).get('models', {}).values())
        for arm in ARMS:
            metrics: Dict[str, float] = {}
            for which in CHECKPOINTS:
                for size in sorted({spec.train_size, spec.test_size}):
                    result = _read_json(spec.root / 'validate' / f'{run_name(arm, seed)}-{which}-{size}px.json')
                    if result is not None:
                        metrics[f'top1_{which}_{size}px'] = float(result['top1'])
            checkpoint = str(spec.checkpoint(arm, seed, 'best'))
            entry = next((m for m in models if m['fingerprint']['checkpoint'] == checkpoint), None)
            if entry is not None:
                metrics.update(_robustness_metrics(entry))
            parts = _read_json(spec.root / 'parts' / f'{run_name(arm, seed)}.json')
            if parts is not None:
                metrics.update({f'part/{k}': v for k, v in parts['accuracy'].items()})
            runs[run_name(arm, seed)] = dict(
                arm=arm, seed=seed, metrics=metrics,
                epochs=read_summary(spec.run_dir(arm, seed) / 'summary.csv'))
    return dict(
        identity=_read_json(spec.root / 'identity' / 'identity.json'),
        start_parts=_read_json(spec.root / 'parts' / 'start.json'),
        runs=runs,
        gates={f'seed{s}': _read_json(spec.root / 'gates' / f'{run_name("tcnn", s)}.json') for s in spec.seeds},
        analysis={name: _read_json(spec.root / 'analyze' / name / 'attention_stats.json')
                  for name in ['conversion', *(f'seed{s}' for s in spec.seeds)]},
    )


def _mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    return dict(mean=statistics.fmean(values) if values else None,
                std=statistics.stdev(values) if len(values) > 1 else None, n=len(values))


def compare(runs: Dict[str, Dict[str, Any]], seeds: Sequence[int]) -> Dict[str, Dict[str, Any]]:
    """Per metric: each arm's mean/std over seeds, the paired difference (tcnn - cnn) and the verdict."""
    metrics = sorted({m for run in runs.values() for m in run['metrics']})
    table = {}
    for metric in metrics:
        values = {arm: {s: runs[run_name(arm, s)]['metrics'].get(metric) for s in seeds} for arm in ARMS}
        paired = [values['tcnn'][s] - values['cnn'][s] for s in seeds
                  if values['tcnn'][s] is not None and values['cnn'][s] is not None]
        diff = _mean_std(paired)
        exceeds = None
        if diff['std'] is not None:
            stderr = diff['std'] / math.sqrt(len(paired))
            exceeds = abs(diff['mean']) > 2 * stderr
        table[metric] = dict(
            **{arm: _mean_std([v for v in values[arm].values() if v is not None]) for arm in ARMS},
            difference=diff, paired=paired, exceeds_seed_spread=exceeds,
        )
    return table


def _fmt(stat: Dict[str, Optional[float]], signed: bool = False) -> str:
    if stat['mean'] is None:
        return '-'
    mean = f'{stat["mean"]:+.2f}' if signed else f'{stat["mean"]:.2f}'
    return mean if stat['std'] is None else f'{mean} +- {stat["std"]:.2f}'


def _verdict(row: Dict[str, Any]) -> str:
    if row['exceeds_seed_spread'] is None:
        return 'one seed: spread unknown'
    if not row['exceeds_seed_spread']:
        return 'within the seed spread'
    return 'T-CNN better, beyond the seed spread' if row['difference']['mean'] > 0 else \
        'CNN better, beyond the seed spread'


HEADLINE_PREFIXES = ('top1_', 'corrupted_accuracy', 'corrupted_clean', 'imagenet_', 'part/')


def _gate_lines(gates: Dict[str, Any]) -> List[str]:
    """Mean content share per converted layer and epoch, averaged over seeds."""
    per_epoch: Dict[int, Dict[str, List[float]]] = {}
    for record in gates.values():
        for epoch, layers in (record or {}).items():
            for name, layer in layers.items():
                per_epoch.setdefault(int(epoch), {}).setdefault(name, []).append(statistics.fmean(layer['content_share']))
    if not per_epoch:
        return ['No gate records (the T-CNN runs wrote no checkpoint yet).']
    names = sorted({n for layers in per_epoch.values() for n in layers})
    lines = ['| epoch | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|',
             '| conversion | ' + ' | '.join('0' for _ in names) + ' |']
    for epoch in sorted(per_epoch):
        lines.append(f'| {epoch} | ' + ' | '.join(
            f'{statistics.fmean(per_epoch[epoch][n]):.3f}' if n in per_epoch[epoch] else '-' for n in names) + ' |')
    return lines


def _analysis_lines(analysis: Dict[str, Any]) -> List[str]:
    start = analysis.get('conversion')
    ends = [a for name, a in analysis.items() if name != 'conversion' and a]
    if not start or not ends:
        return ['No attention analysis yet.']
    lines = ['| layer | content share (end) | attention distance at conversion | attention distance (end) |',
             '|---|---|---|---|']
    for i, layer in enumerate(start['layers']):
        share = statistics.fmean(statistics.fmean(h['content_share'] for h in a['layers'][i]['heads']) for a in ends)
        dist0 = statistics.fmean(h['distance_mixed'] for h in layer['heads'])
        dist1 = statistics.fmean(statistics.fmean(h['distance_mixed'] for h in a['layers'][i]['heads']) for a in ends)
        lines.append(f'| {layer["name"]} | {share:.3f} | {dist0:.2f} px | {dist1:.2f} px |')
    return lines


def _markdown(spec: ExperimentSpec, results: Dict[str, Any], table: Dict[str, Any], state: ExperimentState,
              figures: List[str]) -> str:
    identity = results['identity'] or {}
    lines = [
        f'# {spec.model} vs {spec.cnn_model}: T-CNN against its CNN control', '',
        f'- data: `{spec.data_dir}`; recipe: `{spec.recipe}` (sha256 {spec.recipe_sha256[:12]}); epochs: '
        f'{spec.epochs or "as in the recipe"}; seeds: {", ".join(map(str, spec.seeds))}',
        f'- start: {spec.cnn_checkpoint or "timm pretrained weights of " + spec.cnn_model}; model kwargs '
        f'{spec.model_kwargs}; T-CNN options {spec.tcnn_kwargs}',
        *([f'- transfer: the classifier of the starting weights replaced by a random {spec.num_classes}-class one per '
           f'seed, the same in both arms (`start/seedS.safetensors`)'] if any(k.startswith('start/') for k in state.steps)
          else []),
        f'- identity at conversion: max relative error {identity.get("max_relative_error", float("nan")):.2e} '
        f'(tolerance {identity.get("tolerance", float("nan")):.0e}), top-1 agreement '
        f'{100 * identity.get("top1_agreement", float("nan")):.0f}% on {identity.get("images", 0)} validation images',
        '', '## Headline', '',
        'Top-1 in %. Difference = T-CNN minus CNN with the same seed; it exceeds the seed spread when '
        '|mean| > 2 x std / sqrt(seeds) of the paired differences.', '',
        '| metric | CNN | T-CNN | difference | verdict |', '|---|---|---|---|---|',
    ]
    for metric, row in table.items():
        if metric.startswith(HEADLINE_PREFIXES) and '/' not in metric.replace('part/', ''):
            lines.append(f'| {metric} | {_fmt(row["cnn"])} | {_fmt(row["tcnn"])} | '
                         f'{_fmt(row["difference"], signed=True)} | {_verdict(row)} |')
    if spec.model == 'tcnn_resnet50rs' and spec.num_classes in (None, 1000):
        lines += ['', f'Paper (ResNet50-RS, 50 epochs on ImageNet-1k): T-CNN minus CNN +{PAPER_RESNET50RS["top1"]} '
                      f'top-1, +{PAPER_RESNET50RS["imagenet_c_accuracy"]} top-1 on ImageNet-C.']
    if results['start_parts']:
        lines += ['', 'Accuracy per part of the label of the CNN the arms start from: ' + ', '.join(
            f'{k} {v:.1f}% (chance {results["start_parts"]["chance"][k]:.1f}%)'
            for k, v in results['start_parts']['accuracy'].items())]
    corruption_rows = [m for m in table if '/' in m and not m.startswith('part/')]
    if corruption_rows:
        lines += ['', '## Accuracy per corruption', '', '| corruption | CNN | T-CNN | difference |', '|---|---|---|---|']
        lines += [f'| {m.split("/", 1)[1]} | {_fmt(table[m]["cnn"])} | {_fmt(table[m]["tcnn"])} | '
                  f'{_fmt(table[m]["difference"], signed=True)} |' for m in corruption_rows]
    lines += ['', '## Gates over epochs (mean content share per layer, mean over seeds)', '', *_gate_lines(results['gates'])]
    lines += ['', '## Attention at conversion and at the end (mean over heads and seeds)', '',
              *_analysis_lines(results['analysis'])]
    failed = {k: v for k, v in state.steps.items() if v['status'] != 'done'}
    lines += ['', '## Steps', '', f'{len(state.steps) - len(failed)} of {len(state.steps)} steps done.']
    lines += [f'- {k}: {v["status"]}' + (f' ({v.get("reason") or "log: " + v.get("log", "")})') for k, v in failed.items()]
    if figures:
        lines += ['', '## Figures', ''] + [f'![{Path(f).stem}]({Path(f).name})' for f in figures]
    return '\n'.join(lines) + '\n'


def write_report(spec: ExperimentSpec, state: ExperimentState) -> Dict[str, Any]:
    """Write `results.json`, the figures and `report.md` into the experiment folder; return the results."""
    from .figures import write_figures
    results = collect_results(spec)
    table = compare(results['runs'], spec.seeds)
    figures = write_figures(spec, results, table)
    data = dict(spec=spec_json(spec), results=results, comparison=table, steps=state.steps)
    atomic_write(spec.root / 'results.json', json.dumps(data, indent=1) + '\n')
    atomic_write(spec.root / 'report.md', _markdown(spec, results, table, state, figures))
    return data
