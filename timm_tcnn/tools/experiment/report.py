""" The experiment's report: `results.json`, `report.md` and figures, from the files its steps wrote.

Each comparison (`tcnn` against `cnn`, and against `scratch` where it ran) gives per metric each arm's mean +- std
over seeds, the paired difference (same seed) and an approximate 95% interval for it that counts both sources of
noise: mean +- 2 x sqrt(SE_seeds^2 + SE_images^2). SE_seeds is the std of the paired differences / sqrt(seeds).
SE_images is the sampling error of the evaluation set: from every image's paired difference (averaged over seeds)
where per-image predictions exist, else the unpaired binomial bound sqrt((p_a(1 - p_a) + p_b(1 - p_b)) / images).
A difference is called only when its interval excludes 0 and at least 3 seeds ran.
"""
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...utils.io import atomic_write
from .curves import CURVE_TITLES, curve_order, curve_stats, mean_std
from .figures import write_figures
from .parts import chance_levels, load_image_groups, load_label_parts, part_hits
from .predictions import correct
from .runner import ExperimentState, spec_json
from .spec import CHECKPOINTS, TCNN_ARMS, ExperimentSpec, run_name

__all__ = ['collect_results', 'compare', 'comparisons', 'write_report', 'PAPER_RESNET50RS', 'MIN_SEEDS']

# d'Ascoli et al. 2021: ResNet50-RS fine-tuned 50 epochs on ImageNet-1k, T-CNN minus CNN (top-1 points)
PAPER_RESNET50RS = {'top1': 2.2, 'imagenet_c_accuracy': 11.0}
MIN_SEEDS = 3  # fewer seeds give no verdict: two seeds say little about the spread between seeds


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


def _per_image(spec: ExperimentSpec, record: Dict[str, Any], label_parts, groups) -> Dict[str, Dict[str, List[int]]]:
    """{source (best, last, epoch<N>, start): {metric: [0/1 per image]}} of one predictions file. The best and last
    checkpoints' top-1 are keyed as validate.py's metric at the test size."""
    hits = {}
    for name, predicted in record['predicted'].items():
        metric = f'top1_{name}_{spec.test_size}px' if name in CHECKPOINTS else 'top1'
        hits[name] = {metric: correct(record['targets'], predicted)}
        if label_parts:
            hits[name].update({f'part/{k}': v for k, v in part_hits(record, predicted, label_parts, groups).items()})
    return hits


def _accuracy(hits: Dict[str, List[int]]) -> Dict[str, float]:
    return {k: 100 * sum(v) / len(v) for k, v in hits.items() if v}


def _train_seconds(state: Optional[ExperimentState], arm: str, seed: int) -> Optional[float]:
    entry = (state.steps if state else {}).get(f'train/{arm}/seed{seed}', {})
    return entry.get('seconds') if entry.get('status') == 'done' else None


def _train_attempts(state: Optional[ExperimentState], arm: str, seed: int) -> List[float]:
    """Seconds of every attempt of a training run requeued on a cluster (one attempt: none recorded)."""
    return (state.steps if state else {}).get(f'train/{arm}/seed{seed}', {}).get('attempts', [])


def collect_results(spec: ExperimentSpec, state: Optional[ExperimentState] = None) -> Dict[str, Any]:
    """Every number the steps produced: per arm and seed, metrics, per-image hits, training time and the per-epoch
    curves (train.py's validation top-1; label parts from the recorded weights; gates of T-CNN arms)."""
    label_parts = load_label_parts(spec.data_dir)
    groups = load_image_groups(spec.data_dir, spec.val_split) if label_parts else None
    runs: Dict[str, Dict[str, Any]] = {}
    for seed in spec.seeds:
        robustness = _read_json(spec.root / 'robustness' / f'seed{seed}' / 'robustness.json')
        models = list((robustness or {}).get('models', {}).values())
        for arm in spec.arms:
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
            record = _read_json(spec.predictions(arm, seed))
            hits = _per_image(spec, record, label_parts, groups) if record else {}
            metrics.update({k: v for k, v in _accuracy(hits.get('best', {})).items() if k.startswith('part/')})
            curves = {
                int(name[len('epoch') :]) + 1: _accuracy(h) for name, h in hits.items() if name.startswith('epoch')
            }
            gates = _read_json(spec.root / 'gates' / f'{run_name(arm, seed)}.json') if arm in TCNN_ARMS else None
            epochs = read_summary(spec.run_dir(arm, seed) / 'summary.csv')
            for row in epochs:  # epochs done -> validation top-1 of train.py, content share
                done = int(row['epoch']) + 1
                curves.setdefault(done, {})
                if 'eval_top1' in row:
                    curves[done]['validation_top1'] = row['eval_top1']
                if gates and str(done - 1) in gates:
                    shares = [s for layer in gates[str(done - 1)].values() for s in layer['content_share']]
                    curves[done]['content_share'] = statistics.fmean(shares)
            # the best checkpoint's per-image results, and the last one's top-1
            run_hits = {
                **hits.get('best', {}),
                **{k: v for k, v in hits.get('last', {}).items() if k.startswith('top1_')},
            }
            runs[run_name(arm, seed)] = dict(
                arm=arm,
                seed=seed,
                metrics=metrics,
                seconds=_train_seconds(state, arm, seed),
                attempts=_train_attempts(state, arm, seed),
                predictions_vs_validate={
                    m: v - metrics[m] for m, v in _accuracy(run_hits).items() if m.startswith('top1_') and m in metrics
                },
                hits=run_hits,
                images=len(record['images']) if record else None,
                curves={str(k): curves[k] for k in sorted(curves)},
            )
    start = _read_json(spec.predictions(None, None))
    start_parts = None
    if start and label_parts:
        accuracy = _accuracy(part_hits(start, start['predicted']['start'], label_parts, groups))
        start_parts = dict(
            accuracy=accuracy,
            chance=chance_levels(label_parts, list(accuracy)),
            top1=_accuracy({'top1': correct(start['targets'], start['predicted']['start'])})['top1'],
        )
    return dict(
        identity=_read_json(spec.root / 'identity' / 'identity.json'),
        start_parts=start_parts,
        runs=runs,
        gates={f'seed{s}': _read_json(spec.root / 'gates' / f'{run_name("tcnn", s)}.json') for s in spec.seeds},
        analysis={
            name: _read_json(spec.root / 'analyze' / name / 'attention_stats.json')
            for name in ['conversion', *(f'seed{s}' for s in spec.seeds)]
        },
    )


def _image_error(
    hits: Dict[str, List[List[int]]], means: Dict[str, float], images: Optional[int], arms: Tuple[str, str]
) -> Tuple[Optional[float], str]:
    """The evaluation set's sampling error of the mean paired difference (points) and how it was obtained."""
    a, b = arms
    if hits[a] and len(hits[a]) == len(hits[b]) and all(len(x) == len(hits[a][0]) for x in hits[a] + hits[b]):
        seeds, count = len(hits[a]), len(hits[a][0])
        per_image = [100 * sum(hits[a][s][i] - hits[b][s][i] for s in range(seeds)) / seeds for i in range(count)]
        return (statistics.stdev(per_image) / math.sqrt(count) if count > 1 else None), 'paired per image'
    if images and means[a] is not None and means[b] is not None:
        pa, pb = means[a] / 100, means[b] / 100
        return 100 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / images), 'unpaired bound'
    return None, 'not counted'


def compare(
    runs: Dict[str, Dict[str, Any]],
    seeds: Sequence[int],
    arms: Tuple[str, str] = ('tcnn', 'cnn'),
    images: Optional[int] = None,
) -> Dict[str, Dict[str, Any]]:
    """Per metric: each arm's mean/std over seeds, the paired difference (arms[0] - arms[1], same seed), its
    standard errors from seeds and from images, the interval mean +- 2 x combined SE, and the verdict.

    A run's `hits` ({metric: [0/1 per image]}, the same images in every run) give the paired image error; without
    them, `images` (the evaluation set's size) gives the unpaired bound.
    """
    a, b = arms
    present = [s for s in seeds if run_name(a, s) in runs and run_name(b, s) in runs]
    measured = [{m for s in present for m in runs[run_name(arm, s)]['metrics']} for arm in arms]
    # a metric only one arm has (robustness runs tcnn and cnn) is left out; an arm without results shows as '-'
    metrics = sorted(measured[0] & measured[1] if all(measured) else measured[0] | measured[1])
    table = {}
    for metric in metrics:
        values = {arm: {s: runs[run_name(arm, s)]['metrics'].get(metric) for s in present} for arm in arms}
        paired_seeds = [s for s in present if values[a][s] is not None and values[b][s] is not None]
        paired = [values[a][s] - values[b][s] for s in paired_seeds]
        diff = mean_std(paired)
        stats = {arm: mean_std([v for v in values[arm].values() if v is not None]) for arm in arms}
        hits = {arm: [runs[run_name(arm, s)].get('hits', {}).get(metric) for s in paired_seeds] for arm in arms}
        hits = {arm: h if h and all(x is not None for x in h) else [] for arm, h in hits.items()}
        se_images, method = _image_error(hits, {arm: stats[arm]['mean'] for arm in arms}, images, arms)
        se_seeds = diff['std'] / math.sqrt(len(paired)) if diff['std'] is not None else None
        interval = None
        if se_seeds is not None:
            se = math.sqrt(se_seeds**2 + (se_images or 0.0) ** 2)
            interval = [diff['mean'] - 2 * se, diff['mean'] + 2 * se]
        table[metric] = dict(
            **stats,
            difference=diff,
            paired=paired,
            se_seeds=se_seeds,
            se_images=se_images,
            image_error=method,
            interval=interval,
            verdict=_verdict(diff['mean'], interval, len(paired), arms),
        )
    return table


def _verdict(mean: Optional[float], interval: Optional[List[float]], seeds: int, arms: Tuple[str, str]) -> str:
    if interval is None:
        return 'one seed: spread unknown' if seeds == 1 else 'no paired results'
    if seeds < MIN_SEEDS:
        return f'too few seeds ({seeds} < {MIN_SEEDS})'
    if interval[0] <= 0 <= interval[1]:
        return 'within the noise (seeds and images)'
    return f'{arms[0] if mean > 0 else arms[1]} better, beyond the noise'


def comparisons(spec: ExperimentSpec) -> List[Tuple[str, str]]:
    """The arm pairs the report compares: tcnn against each other arm that ran."""
    return [('tcnn', arm) for arm in spec.arms if arm != 'tcnn']


def _fmt(stat: Dict[str, Optional[float]], signed: bool = False, digits: int = 2) -> str:
    if stat['mean'] is None:
        return '-'
    mean = f'{stat["mean"]:+.{digits}f}' if signed else f'{stat["mean"]:.{digits}f}'
    return mean if stat['std'] is None else f'{mean} +- {stat["std"]:.{digits}f}'


HEADLINE_PREFIXES = ('top1_', 'corrupted_accuracy', 'corrupted_clean', 'imagenet_', 'part/')


def _gate_lines(gates: Dict[str, Any]) -> List[str]:
    """Mean content share per converted layer and epoch, averaged over seeds."""
    per_epoch: Dict[int, Dict[str, List[float]]] = {}
    for record in gates.values():
        for epoch, layers in (record or {}).items():
            for name, layer in layers.items():
                per_epoch.setdefault(int(epoch), {}).setdefault(name, []).append(
                    statistics.fmean(layer['content_share'])
                )
    if not per_epoch:
        return ['No gate records (the T-CNN runs wrote no checkpoint yet).']
    names = sorted({n for layers in per_epoch.values() for n in layers})
    lines = [
        '| epochs done | ' + ' | '.join(names) + ' |',
        '|---' * (len(names) + 1) + '|',
        '| conversion | ' + ' | '.join('0' for _ in names) + ' |',
    ]
    for epoch in sorted(per_epoch):
        lines.append(
            f'| {epoch + 1} | '
            + ' | '.join(
                f'{statistics.fmean(per_epoch[epoch][n]):.3f}' if n in per_epoch[epoch] else '-' for n in names
            )
            + ' |'
        )
    return lines


def _analysis_lines(analysis: Dict[str, Any]) -> List[str]:
    start = analysis.get('conversion')
    ends = [a for name, a in analysis.items() if name != 'conversion' and a]
    if not start or not ends:
        return ['No attention analysis yet.']
    lines = [
        '| layer | content share (end) | attention distance at conversion | attention distance (end) |',
        '|---|---|---|---|',
    ]
    for i, layer in enumerate(start['layers']):
        share = statistics.fmean(statistics.fmean(h['content_share'] for h in a['layers'][i]['heads']) for a in ends)
        dist0 = statistics.fmean(h['distance_mixed'] for h in layer['heads'])
        dist1 = statistics.fmean(statistics.fmean(h['distance_mixed'] for h in a['layers'][i]['heads']) for a in ends)
        lines.append(f'| {layer["name"]} | {share:.3f} | {dist0:.2f} px | {dist1:.2f} px |')
    return lines


ARM_TITLES = {'tcnn': 'T-CNN from the CNN', 'cnn': 'CNN', 'scratch': 'T-CNN from scratch'}


def training_times(spec: ExperimentSpec, runs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per arm: its training wall clock per seed (mean, std), the time before it (the starting CNN's training, for the
    routes from the CNN, where known) and the route's total, in seconds and device-hours (wall x processes)."""
    before = spec.scratch.cnn_seconds if spec.scratch else None
    times = {}
    for arm in spec.arms:
        seconds = mean_std([r['seconds'] for r in runs.values() if r['arm'] == arm and r['seconds'] is not None])
        prior = None if arm == 'scratch' else before
        total = None if seconds['mean'] is None else seconds['mean'] + (prior or 0.0)
        times[arm] = dict(
            train_seconds=seconds,
            before_seconds=prior,
            route_seconds=total,
            route_device_hours=None if total is None else total * spec.nproc / 3600,
        )
    return times


def _curve_lines(spec: ExperimentSpec, runs: Dict[str, Dict[str, Any]]) -> List[str]:
    stats = {arm: curve_stats(runs, arm) for arm in spec.arms}
    keys = sorted({k for arm_stats in stats.values() for k in arm_stats}, key=curve_order)
    if not keys:
        return ['No per-epoch results yet.']
    lines = []
    for key in keys:
        epochs = sorted({e for arm in spec.arms for e in stats[arm].get(key, {})})
        arms = [arm for arm in spec.arms if key in stats[arm]]
        what = CURVE_TITLES.get(key, f'accuracy (%) on {key}, at the test size')
        lines += [f'**{what}**', '', '| epochs done | ' + ' | '.join(arms) + ' |', '|---' * (len(arms) + 1) + '|']
        for e in epochs:
            cells = [stats[arm][key].get(e) for arm in arms]
            digits = 3 if key == 'content_share' else 2
            lines.append(f'| {e} | ' + ' | '.join('-' if c is None else _fmt(c, digits=digits) for c in cells) + ' |')
        lines.append('')
    return lines


def _time_lines(spec: ExperimentSpec, times: Dict[str, Dict[str, Any]], runs: Dict[str, Dict[str, Any]]) -> List[str]:
    unit = 'GPU-hours' if spec.device.startswith('cuda') else 'CPU-hours'
    lines = [
        f'Wall clock of each train.py run (mean +- std over seeds); {unit} = wall clock x {spec.nproc} '
        f'process(es). The routes from the CNN also count its training'
        + (
            f' ({spec.scratch.cnn_seconds:.0f} s, from its run folder: args.yaml to the checkpoint).'
            if spec.scratch and spec.scratch.cnn_seconds is not None
            else ' where known (not known here: timm\'s weights, or a checkpoint without its run folder).'
        ),
        '',
        f'| arm | epochs | training (s) | before it (s) | route (s) | route ({unit}) |',
        '|---|---|---|---|---|---|',
    ]
    for arm, t in times.items():
        epochs = (
            spec.scratch.epochs
            if arm == 'scratch'
            else (spec.scratch.finetune_epochs if spec.scratch else spec.epochs or "the recipe's")
        )
        before = '-' if t['before_seconds'] is None else f'{t["before_seconds"]:.0f}'
        route = '-' if t['route_seconds'] is None else f'{t["route_seconds"]:.0f}'
        hours = '-' if t['route_device_hours'] is None else f'{t["route_device_hours"]:.3f}'
        lines.append(f'| {arm} | {epochs} | {_fmt(t["train_seconds"], digits=0)} | {before} | {route} | {hours} |')
    requeued = {f'train/{r["arm"]}/seed{r["seed"]}': r['attempts'] for r in runs.values() if len(r['attempts']) > 1}
    if requeued:
        lines += ['', 'Runs requeued on the cluster (time limit or pre-emption; training time counts every attempt):']
        lines += [f'- {key}: {len(a)} attempts ({", ".join(f"{s:.0f} s" for s in a)})' for key, a in requeued.items()]
    return lines


def _consistency_line(runs: Dict[str, Dict[str, Any]]) -> str:
    """Whether the per-image predictions behind the verdicts give validate.py's top-1 (same checkpoints and size)."""
    gaps = [abs(g) for run in runs.values() for g in run['predictions_vs_validate'].values()]
    if not gaps:
        return '- per-image predictions: none yet'
    return (
        f'- per-image predictions (behind the intervals) against validate.py on the same {len(gaps)} checkpoints: '
        f'largest top-1 difference {max(gaps):.2f} points'
        + ('' if max(gaps) < 0.01 else ' (they should agree: check the preprocessing)')
    )


def _comparison_lines(table: Dict[str, Any], arms: Tuple[str, str]) -> List[str]:
    a, b = arms
    lines = [
        f'### {a} ({ARM_TITLES[a]}) against {b} ({ARM_TITLES[b]})',
        '',
        f'| metric | {b} | {a} | difference | 95% interval | images | verdict |',
        '|---|---|---|---|---|---|---|',
    ]
    for metric, row in table.items():
        if metric.startswith(HEADLINE_PREFIXES) and '/' not in metric.replace('part/', ''):
            interval = '-' if row['interval'] is None else f'[{row["interval"][0]:+.2f}, {row["interval"][1]:+.2f}]'
            lines.append(
                f'| {metric} | {_fmt(row[b])} | {_fmt(row[a])} | {_fmt(row["difference"], signed=True)} | '
                f'{interval} | {row["image_error"]} | {row["verdict"]} |'
            )
    return lines


def _markdown(
    spec: ExperimentSpec, results: Dict[str, Any], tables: Dict[str, Any], state: ExperimentState, figures: List[str]
) -> str:
    identity = results['identity'] or {}
    scratch = spec.scratch
    lines = [
        f'# {spec.model} vs {spec.cnn_model}: T-CNN against its CNN control',
        '',
        f'- data: `{spec.data_dir}`; recipe: `{spec.recipe}` (sha256 {spec.recipe_sha256[:12]}); epochs: '
        f'{spec.epochs or "as in the recipe"}; seeds: {", ".join(map(str, spec.seeds))}; arms: {", ".join(spec.arms)}',
        f'- start: {spec.cnn_checkpoint or "timm pretrained weights of " + spec.cnn_model}; model kwargs '
        f'{spec.model_kwargs}; T-CNN options {spec.tcnn_kwargs}',
        *(
            [
                f'- scratch arm: the T-CNN from its own initialisation, {scratch.epochs} epochs (the starting CNN\'s '
                f'{scratch.cnn_epochs} + the fine-tune\'s {scratch.finetune_epochs}), recipe `{scratch.recipe_source}` '
                f'without its run\'s own options (`scratch/recipe.yaml`)'
            ]
            if scratch
            else []
        ),
        *(
            [
                f'- transfer: the classifier of the starting weights replaced by a random {spec.num_classes}-class '
                'one per '
                f'seed, the same in both arms (`start/seedS.safetensors`)'
            ]
            if any(k.startswith('start/') for k in state.steps)
            else []
        ),
        f'- identity at conversion: max relative error {identity.get("max_relative_error", float("nan")):.2e} '
        f'(tolerance {identity.get("tolerance", float("nan")):.0e}), top-1 agreement '
        f'{100 * identity.get("top1_agreement", float("nan")):.0f}% on {identity.get("images", 0)} validation images',
        _consistency_line(results['runs']),
        '',
        '## Headline',
        '',
        'Top-1 in %. Difference = first arm minus second with the same seed (mean +- std over seeds). 95% interval = '
        'mean +- 2 x sqrt(SE_seeds^2 + SE_images^2), SE_seeds = std / sqrt(seeds); SE_images from every image\'s '
        'paired difference (`paired per image`, the best or last checkpoint at the test size) or, without per-image '
        f'results, the unpaired binomial bound (`unpaired bound`). A verdict needs at least {MIN_SEEDS} seeds and an '
        'interval excluding 0.',
        '',
    ]
    for arms, table in tables.items():
        lines += _comparison_lines(table, arms) + ['']
    if spec.model == 'tcnn_resnet50rs' and spec.num_classes in (None, 1000):
        lines += [
            f'Paper (ResNet50-RS, 50 epochs on ImageNet-1k): T-CNN minus CNN +{PAPER_RESNET50RS["top1"]} '
            f'top-1, +{PAPER_RESNET50RS["imagenet_c_accuracy"]} top-1 on ImageNet-C.',
            '',
        ]
    if results['start_parts']:
        start = results['start_parts']
        lines += [
            f'The CNN the arms start from: top-1 {start["top1"]:.1f}%; per part of the label: '
            + ', '.join(f'{k} {v:.1f}% (chance {start["chance"][k]:.1f}%)' for k, v in start['accuracy'].items()),
            '',
        ]
    lines += ['## Training time', '', *_time_lines(spec, results['times'], results['runs'])]
    main = tables.get(('tcnn', 'cnn'), {})
    corruption_rows = [m for m in main if '/' in m and not m.startswith('part/')]
    if corruption_rows:
        lines += [
            '',
            '## Accuracy per corruption',
            '',
            '| corruption | CNN | T-CNN | difference |',
            '|---|---|---|---|',
        ]
        lines += [
            f'| {m.split("/", 1)[1]} | {_fmt(main[m]["cnn"])} | {_fmt(main[m]["tcnn"])} | '
            f'{_fmt(main[m]["difference"], signed=True)} |'
            for m in corruption_rows
        ]
    lines += ['', '## Learning curves (mean +- std over seeds, per epoch)', '', *_curve_lines(spec, results['runs'])]
    lines += [
        '## Gates over epochs (mean content share per layer, mean over seeds)',
        '',
        *_gate_lines(results['gates']),
    ]
    lines += [
        '',
        '## Attention at conversion and at the end (mean over heads and seeds)',
        '',
        *_analysis_lines(results['analysis']),
    ]
    failed = {k: v for k, v in state.steps.items() if v['status'] != 'done'}
    lines += ['', '## Steps', '', f'{len(state.steps) - len(failed)} of {len(state.steps)} steps done.']
    lines += [
        f'- {k}: {v["status"]}' + (f' ({v.get("reason") or "log: " + v.get("log", "")})') for k, v in failed.items()
    ]
    if figures:
        lines += ['', '## Figures', ''] + [f'![{Path(f).stem}]({Path(f).name})' for f in figures]
    return '\n'.join(lines) + '\n'


def write_report(spec: ExperimentSpec, state: ExperimentState) -> Dict[str, Any]:
    """Write `results.json`, the figures and `report.md` into the experiment folder; return the results."""
    results = collect_results(spec, state)
    images = next((r['images'] for r in results['runs'].values() if r['images']), None)
    tables = {arms: compare(results['runs'], spec.seeds, arms, images) for arms in comparisons(spec)}
    results['times'] = training_times(spec, results['runs'])
    figures = write_figures(spec, results, tables)
    runs = {name: {k: v for k, v in run.items() if k != 'hits'} for name, run in results['runs'].items()}
    data = dict(
        spec=spec_json(spec),
        results={**results, 'runs': runs},
        comparisons={f'{a} - {b}': table for (a, b), table in tables.items()},
        steps=state.steps,
    )
    atomic_write(spec.root / 'results.json', json.dumps(data, indent=1) + '\n')
    atomic_write(spec.root / 'report.md', _markdown(spec, results, tables, state, figures))
    return data
