"""The benchmark runs end to end and writes well-formed JSON (its numbers are not asserted as targets)."""
import json
import math

import pytest

from conftest import make_image_folder
from sd_zoo.cli import main


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    rc = main(['bench', '--model', 'sd_resnet20', '--batch-size', '8', '--img-size', '16', '--steps', '2',
               '--warmup', '1', '--eval-batches', '2', '--memory-steps', '1', '--compile', '--compile-steps', '2',
               '--json', str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'sd_batch' in printed and 'limit (schedule)' in printed and str(out) in printed
    res = json.loads(out.read_text())
    assert 'unfinished' not in res
    train = res['train']
    assert set(train['variants']) == {'sd_batch', 'sd_subset', 'constant', 'sd_sample', 'timm_droppath', 'stem_head'}
    assert 0 < train['mean_active_blocks_subset'] <= 9
    assert train['num_blocks'] == 9 and train['expected_active_blocks'] == pytest.approx(6.5)
    assert train['ratio_to_constant']['constant'] == 1.0
    # the spread of each row: per-step ratios to the constant step beside it, and the machine that made them
    for name, q in train['ratio_spread'].items():
        assert q['min'] <= q['p25'] <= q['median'] <= q['p75'] <= q['max'], name
    assert train['ratio_spread']['constant'] == dict(min=1.0, p25=1.0, median=1.0, p75=1.0, max=1.0)
    assert 'p25-p75' in printed and res['ddp']['ratio_spread'] and res['compile']['ratio_spread']
    env = res['environment']
    assert env['date_utc'].endswith('Z') and env['torch_threads'] >= 1 and 'cpu_model' in env
    assert env['sd_zoo_source'] is None or len(env['sd_zoo_source'].split('+')[0]) == 40  # the commit measured
    assert env['cpu_model'] is None or isinstance(env['cpu_model'], str) and env['cpu_model']
    assert all(v['steps'] == 2 and v['median_s'] > 0 for v in train['variants'].values())
    assert 0 < train['stem_head_share'] < 1 and 0 < train['limit_ratio'] < 1
    assert res['ddp']['find_unused_parameters'] is False and res['ddp']['world_size'] == 2
    assert set(res['ddp']['variants']) == {'sd_batch', 'sd_subset', 'constant'}
    assert res['eval']['max_rel_output_diff'] < 1e-5  # folded SD and the plain ResNet compute the same
    assert res['eval']['ratio'] > 0
    for variant in ('constant', 'sd_batch'):
        assert res['memory'][variant]['saved_activations_mib'] > 0
    assert 0 < res['memory']['saved_activations_ratio'] <= 1.0  # skipped blocks save no activations
    comp = res['compile']
    assert comp['compiled_graphs'] >= 1 and comp['steps'] == 4
    assert set(comp['graphs_per_variant']) == {'sd_batch', 'sd_subset', 'constant'}
    assert comp['compiled_graphs'] == sum(comp['graphs_per_variant'].values()) and comp['ratio_subset'] > 0
    assert 'subset / constant (compiled)' in printed
    assert all(math.isfinite(v['median_s']) for v in comp['variants'].values())


def test_bench_json_is_rewritten_after_each_part(tmp_path, monkeypatch):
    """A late failure keeps what was measured: the file names the parts still to run until the last one ends;
    an existing file is replaced only under --overwrite (without it: tests/test_faults.py)."""
    from sd_zoo import bench
    out = tmp_path / 'bench.json'
    out.write_text('a previous run')
    written, write_atomic = [], bench.write_atomic
    monkeypatch.setattr(bench, 'write_atomic', lambda path, text: (written.append(json.loads(text)),
                                                                   write_atomic(path, text)))
    assert main(['bench', '--model', 'sd_resnet20', '--batch-size', '2', '--img-size', '16', '--steps', '1',
                 '--warmup', '0', '--cost-steps', '1', '--eval-batches', '1', '--skip', 'ddp', 'memory',
                 '--json', str(out), '--overwrite']) == 0
    assert [w.get('unfinished') for w in written] == [['train', 'eval'], ['eval'], None]
    assert 'train' in written[1] and 'eval' not in written[1]
    assert json.loads(out.read_text()) == written[-1]


def test_bench_rejects_unknown_model(capsys):
    assert main(['bench', '--model', 'resnet_nonexistent', '--skip', 'ddp', 'eval', 'memory']) == 2
    assert "unknown --model 'resnet_nonexistent'" in capsys.readouterr().err
    assert main(['bench', '--model', 'resnet50']) == 2  # a timm model, but not one add_stochastic_depth's gates fit
    assert 'no timm ViT Block / ResPostBlock or ConvNeXtBlock' in capsys.readouterr().err
    assert main(['bench', '--model', 'convnext_atto', '--compile']) == 2
    assert '--compile compares sd-zoo ResNets' in capsys.readouterr().err


@pytest.mark.parametrize('model, size, stages', [
    ('vit_tiny_patch16_224', 32, {'blocks'}),
    ('convnext_atto', 32, {f'stages.{i}.blocks' for i in range(4)}),
])
def test_bench_times_timm_droppath_against_converted_gates(tmp_path, capsys, model, size, stages):
    """A timm ViT / ConvNeXt: its DropPath against the converted model's batch and subset gates at timm's own
    per-block rates, the train part only (no DDP, eval or memory rows without --skip)."""
    import timm
    from sd_zoo.models import add_stochastic_depth, branch_rates
    out = tmp_path / 'bench.json'
    assert main(['bench', '--model', model, '--img-size', str(size), '--batch-size', '4', '--steps', '2',
                 '--warmup', '1', '--cost-steps', '1', '--drop-path', '0.4', '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) == {'config', 'environment', 'train'}
    train = res['train']
    assert set(train['variants']) == {'sd_batch', 'sd_subset', 'sd_fixed_subset', 'constant', 'timm_droppath',
                                      'stem_head'}
    assert set(train['ratio_to_droppath']) == set(train['ratio_to_droppath_spread']) == {
        'sd_batch', 'sd_subset', 'sd_fixed_subset'}
    # the gates are the DropPath's: one per branch, at timm's rates for drop_path_rate 0.4
    rates = branch_rates(add_stochastic_depth(timm.create_model(model, drop_path_rate=0.4)))
    assert train['num_blocks'] == len(rates) and train['expected_active_blocks'] == pytest.approx(sum(rates))
    assert min(rates) == pytest.approx(0.6) and max(rates) == 1.0
    assert set(train['stage_costs']['stage_share']) == stages
    assert 0 < train['limit_ratio'] < 1 and '/ DropPath' in printed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_runs_on_sd_resnet50(tmp_path):
    out = tmp_path / 'bench50.json'
    assert main(['bench', '--model', 'sd_resnet50', '--batch-size', '2', '--img-size', '64', '--steps', '2',
                 '--warmup', '1', '--cost-steps', '1', '--eval-batches', '1', '--skip', 'ddp', 'memory',
                 '--json', str(out)]) == 0
    res = json.loads(out.read_text())
    assert res['train']['num_blocks'] == 16 and res['train']['expected_active_blocks'] == pytest.approx(11.75)
    assert set(res['train']['stage_costs']['stage_share']) == {'layer1', 'layer2', 'layer3', 'layer4'}
    assert res['eval']['max_rel_output_diff'] < 1e-5  # folded SD == timm's own resnet50 with those weights


def test_bench_data_section_on_real_images(tmp_path, capsys):
    """Both loaders, both variants, end-to-end epochs over real files; the step ratio over the same gates."""
    make_image_folder(tmp_path / 'data', splits=(('train', 4),), suffix='.jpg')
    out = tmp_path / 'bench.json'
    assert main(['bench', '--skip', 'train', 'ddp', 'eval', 'memory', '--data-dir', str(tmp_path / 'data'),
                 '--data-models', 'sd_resnet20', '--data-images', '32', '--batch-size', '8', '--data-workers', '0',
                 '--json', str(out)]) == 0
    assert 'sd_resnet20 memory / timm' in capsys.readouterr().out
    m = json.loads(out.read_text())['data']['models']['sd_resnet20']
    assert m['images_per_epoch'] == 32
    for kind in ('timm', 'memory'):
        assert set(m['epoch_s'][kind]) == {'constant', 'sd_batch'} and all(t > 0 for t in m['epoch_s'][kind].values())
        assert m['epoch_ratio'][kind] > 0
    assert m['step_ratio'] > 0 and m['memory_speedup']['constant'] > 0


def test_tables_of_the_parts_that_ran_are_printed_without_the_train_part():
    """--skip train still prints the compile (and DDP, eval, memory) tables, not only the JSON."""
    from sd_zoo.bench import format_table
    compiled = dict(variants={n: dict(median_s=s) for n, s in (('sd_batch_compiled', 2.0), ('sd_subset_compiled', 2.2),
                                                              ('constant_compiled', 2.5))},
                    ratio=0.8, ratio_subset=0.88, distinct_gate_patterns=5, steps=6,
                    graphs_per_variant=dict(sd_batch=4, sd_subset=6, constant=0),
                    ratio_spread={n: dict(min=r - 0.1, p25=r - 0.05, median=r, p75=r + 0.05, max=r + 0.1)
                                  for n, r in (('sd_batch_compiled', 0.8), ('sd_subset_compiled', 0.88),
                                               ('constant_compiled', 1.0))})
    table = format_table(dict(environment=dict(device='cpu'), compile=compiled))
    assert 'SD / constant (compiled)         0.800' in table and 'constant_compiled' in table
    assert '0.750-0.850 (0.700-0.900)' in table  # the row's spread
