"""sd-zoo train / validate end to end on the real (shared) CIFAR-10, and the CLI's errors."""
import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sd_zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / 'sd_zoo' / 'recipes'
SMALL = ['--model', 'sd_resnet20', '--cifar-aug', '--train-split', 'train', '--val-split', 'test',
         '--train-subset', '512', '--val-subset', '256', '-b', '64', '-j', '0', '--no-progress',
         '--lr', '0.1', '--sched', 'multistep', '--decay-milestones', '100']


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_then_validate_on_cifar10_subset(cifar10_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger='sd_zoo')
    # 2,048 training images: on 512, two epochs ended at 10.5-15.8% over seeds 0-3 and 42 (chance is 10%)
    more = [('2048' if a == '512' else a) for a in SMALL]
    rc = main(['train', '--data-dir', str(cifar10_dir), *more, '--epochs', '2', '--output', str(tmp_path),
               '--experiment', 'run', '--model-ema', '--model-ema-decay', '0.9'])
    assert rc == 0
    out = tmp_path / 'run'
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'epochs.csv', 'results.json'):
        assert (out / name).exists(), name
    rows = _summary(out / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']  # timm's columns
    epochs = _summary(out / 'epochs.csv')
    assert all(float(e['wall_s']) > 0 and 0 < float(e['mean_active_blocks']) <= 9 for e in epochs)
    ckpt = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert {'epoch', 'arch', 'state_dict', 'state_dict_ema', 'optimizer', 'args', 'version'} <= set(ckpt)
    assert ckpt['arch'] == 'sd_resnet20' and ckpt['epoch'] == 1
    assert yaml.safe_load((out / 'args.yaml').read_text())['model'] == 'sd_resnet20'
    epoch_lines = [m for m in caplog.messages if re.match(r'epoch \d+: train loss', m)]
    assert len(epoch_lines) == 2 and re.search(r'; 1 epoch left, about \d+ min$', epoch_lines[0]), epoch_lines
    assert 'left' not in epoch_lines[1]

    capsys.readouterr()
    results_file = tmp_path / 'val.json'
    rc = main(['validate', '--model', 'sd_resnet20', '--checkpoint', str(out / 'model_best.pth.tar'),
               '--data-dir', str(cifar10_dir), '--split', 'test', '--subset', '2000', '-j', '0',
               '--results-file', str(results_file)])
    assert rc == 0
    res = json.loads(results_file.read_text())
    assert res['images'] == 2000 and 0 <= res['top1'] <= 100 and res['top5'] >= res['top1']
    # two short epochs on 2,048 images already beat chance (10%) on CIFAR-10: 12.5% on 2,000 images is 3.7
    # standard errors above it (16.0-22.6% seen over seeds 0-3 and 42)
    assert res['top1'] > 12.5
    csv_file = tmp_path / 'val.csv'
    assert main(['validate', '--model', 'sd_resnet20', '--checkpoint', str(out / 'last.pth.tar'),
                 '--data-dir', str(cifar10_dir), '--split', 'test', '--subset', '64', '-j', '0',
                 '--results-file', str(csv_file)]) == 0
    assert _summary(csv_file)[0]['split'] == 'test'
    assert main(['validate', '--model', 'sd_resnet20', '--checkpoint', str(out / 'last.pth.tar'),
                 '--data-dir', str(cifar10_dir), '--split', 'test', '--subset', '32', '-j', '0',
                 '--results-file', str(csv_file), '--overwrite']) == 0  # an existing file: only with --overwrite
    assert _summary(csv_file)[0]['images'] == '32'


@pytest.mark.slow
def test_val_holdout_reports_test_at_best_epoch(cifar10_dir, tmp_path):
    rc = main(['train', '--data-dir', str(cifar10_dir), *SMALL, '--epochs', '2', '--val-holdout', '256',
               '--output', str(tmp_path), '--experiment', 'holdout'])
    assert rc == 0
    res = json.loads((tmp_path / 'holdout' / 'results.json').read_text())
    assert res['test']['split'] == 'test' and res['test']['epoch'] == res['best_epoch']
    assert 0 <= res['test']['top1'] <= 100


@pytest.mark.slow
def test_resume_after_kill_mid_epoch(cifar10_dir, tmp_path):
    out = tmp_path / 'killed'
    cmd = [sys.executable, '-m', 'sd_zoo.cli', 'train', '--data-dir', str(cifar10_dir), *SMALL,
           '--train-subset', '2048', '--epochs', '3', '--output', str(tmp_path), '--experiment', 'killed']
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / 'last.pth.tar').exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / 'last.pth.tar').exists(), 'the first epoch never finished'
        time.sleep(1.5)  # well into the second epoch (each takes several seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r['epoch'] for r in _summary(out / 'summary.csv')] == ['0']
    rc = main(['train', '--data-dir', str(cifar10_dir), *SMALL, '--train-subset', '2048', '--epochs', '3',
               '--resume', str(out / 'last.pth.tar')])
    assert rc == 0
    assert [r['epoch'] for r in _summary(out / 'summary.csv')] == ['0', '1', '2']  # no epoch lost or repeated
    assert torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=False)['epoch'] == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_two_processes(cifar10_dir, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'sd_zoo.cli', 'train', '--data-dir', str(cifar10_dir), *SMALL, '--epochs', '1',
           '--output', str(tmp_path), '--experiment', 'ddp', '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    args = yaml.safe_load((tmp_path / 'ddp' / 'args.yaml').read_text())
    assert args['distributed'] is True and args['world_size'] == 2
    assert [r['epoch'] for r in _summary(tmp_path / 'ddp' / 'summary.csv')] == ['0']


def test_recipes_are_train_py_configs():
    import sd_zoo.train_args as training
    parser = training.build_train_parser()
    recipes = sorted(RECIPES.glob('*.yaml'))
    assert len(recipes) >= 10
    for path in recipes:
        cfg = training.load_config(str(path), parser)  # every key is a known train.py flag name
        assert cfg['device_modules'] == ['sd_zoo'], path.name
        args = training.parse_train_args(['--config', str(path)])
        assert args.model.startswith('sd_resnet')
        assert args.model == cfg['model'] and args.epochs == cfg['epochs']
        # timm's train.py defaults to label smoothing 0.1: every recipe says what it uses
        assert 'smoothing' in cfg, path.name
    paper = yaml.safe_load((RECIPES / 'cifar10_resnet110_sd.yaml').read_text())
    assert paper['epochs'] == 500 and paper['batch_size'] == 128 and paper['lr'] == 0.1
    assert paper['decay_milestones'] == [250, 375] and paper['drop_path'] == 0.5 and paper['opt'] == 'sgd'
    assert paper['smoothing'] == 0.0
    twin = yaml.safe_load((RECIPES / 'cifar10_resnet110_constant.yaml').read_text())
    assert {k: v for k, v in twin.items() if k != 'drop_path'} == {k: v for k, v in paper.items() if k != 'drop_path'}
    assert twin['drop_path'] == 0.0


def test_cli_errors(tmp_path, capsys):
    assert main(['train', '--model', 'sd_resnet20']) == 2
    assert 'no dataset' in capsys.readouterr().err
    assert main(['train', '--data-dir', str(tmp_path / 'missing')]) == 2
    assert 'is not a folder' in capsys.readouterr().err
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: sd_resnet20\nnot_a_flag: 3\n')
    assert main(['train', '--config', str(bad), '--data-dir', str(tmp_path)]) == 2
    assert 'not_a_flag' in capsys.readouterr().err
    assert main(['train', '--config', str(tmp_path / 'none.yaml')]) == 2
    assert 'neither a file nor a recipe name' in capsys.readouterr().err
    assert main(['train', '--data-dir', str(tmp_path), '--resume', str(tmp_path / 'x.pth.tar')]) == 2
    assert 'no such checkpoint' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['train', '--not-a-train-flag'])
    assert main(['train', '--data-dir', str(tmp_path), '--model', 'no_such_model', '-j', '0']) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    assert main(['train', '--data-dir', str(empty), '--model', 'sd_resnet20', '-j', '0']) == 2
    assert "split 'train': Found 0 images" in capsys.readouterr().err
    assert main(['validate', '--model', 'sd_resnet20', '--data-dir', str(tmp_path),
                 '--checkpoint', str(tmp_path / 'nope.pth')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    assert main(['validate', '--model', 'sd_resnet20', '--data-dir', str(tmp_path), '--results-file', 'r.txt']) == 2
    assert '.json or .csv' in capsys.readouterr().err
    junk_resume = tmp_path / 'junk_resume.pth.tar'
    junk_resume.write_bytes(b'no checkpoint here')
    (empty / 'train' / 'c0').mkdir()
    from PIL import Image
    Image.new('RGB', (32, 32)).save(empty / 'train' / 'c0' / 'a.png')
    assert main(['train', '--data-dir', str(empty), '--model', 'sd_resnet20', '-j', '0', '-b', '1', '--val-split',
                 '', '--resume', str(junk_resume), '--output', str(tmp_path / 'o')]) == 2
    assert 'cannot resume from' in capsys.readouterr().err
    not_ckpt = tmp_path / 'junk.pth.tar'
    not_ckpt.write_bytes(b'not a checkpoint')
    assert main(['validate', '--model', 'sd_resnet20', '--data-dir', str(tmp_path), '--checkpoint',
                 str(not_ckpt)]) == 2
    assert 'junk.pth.tar' in capsys.readouterr().err


def test_config_scalars_of_list_flags_are_one_element_lists(tmp_path):
    """A YAML scalar of a list flag reads as the command line would read the one value."""
    import sd_zoo.training as training
    config = tmp_path / 'scalars.yaml'
    config.write_text('mean: 0.5\nstd: 0.25\ndecay_milestones: 250\ndevice_modules: sd_zoo\nscale: [0.5, 1]\n')
    from_yaml = vars(training.parse_train_args(['--config', str(config)]))
    from_flags = vars(training.parse_train_args(['--mean', '0.5', '--std', '0.25', '--decay-milestones', '250',
                                                 '--device-modules', 'sd_zoo', '--scale', '0.5', '1']))
    assert from_yaml == dict(from_flags, config=str(config))  # the recipe is recorded, as train(config=...) does
    assert from_yaml['mean'] == [0.5] and from_yaml['decay_milestones'] == [250] and from_yaml['scale'] == [0.5, 1.0]


def test_the_gate_seed_is_the_runs_seed_and_a_resume_keeps_the_recorded_one(tmp_path):
    from sd_zoo.runs import ResumePoint, create_run_model, gate_seed_of
    from sd_zoo.stochastic_depth import stochastic_blocks
    assert gate_seed_of(dict(gate_seed=3)) == 3 and gate_seed_of({}) == 0  # before the record: sd_seed's default
    assert gate_seed_of(dict(gate_seed=3, model_kwargs=dict(sd_seed=5))) == 5  # given explicitly: it wins
    with pytest.raises(ValueError, match='gate seed True is not a whole number'):
        gate_seed_of(dict(gate_seed=True))
    model = create_run_model(dict(model='sd_resnet20', gate_seed=7))  # rebuilt as it trained
    assert {b.gate_seed for b in stochastic_blocks(model)} == {7}
    run = tmp_path / 'run'
    run.mkdir()
    point = ResumePoint(path=str(run / 'last.pth.tar'), meta={}, in_place=True)
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(model='sd_resnet20', seed=42)))
    assert point.gate_seed == 0  # a run from before the record continues with the gates it drew
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(model='sd_resnet20', seed=42, gate_seed=42)))
    assert point.gate_seed == 42


def test_resume_compares_what_the_arguments_meant(tmp_path):
    """An older torchvision run whose default --val-split validation meant test continues with --val-split
    test; with --val-holdout a torchvision run reports 'test'; a value the run left unset (timm train.py's
    lr: None) is not compared."""
    from sd_zoo.runs import check_same_experiment, experiment_values, test_split_of
    from sd_zoo.train_args import parse_train_args
    old = dict(dataset='torch/cifar10', val_split='validation', val_holdout=0, test_split=None, lr=None)
    now = dict(old, val_split='test', lr=0.1)
    assert experiment_values(old)['val_split'] == experiment_values(now)['val_split'] == 'test'
    held_out = dict(old, val_holdout=5000)
    assert test_split_of(held_out) == 'test' and experiment_values(held_out)['val_split'] is None
    assert test_split_of(dict(dataset='', val_split='val', val_holdout=10, test_split=None)) == 'val'
    assert test_split_of(dict(old, test_split='extra')) == 'extra' and test_split_of(old) is None
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(old, model='sd_resnet20', seed=42)))
    (run / 'last.pth.tar').write_bytes(b'')  # only its folder's args.yaml is read here
    args = parse_train_args(['--model', 'sd_resnet20', '--dataset', 'torch/cifar10', '--val-split', 'test',
                             '--lr', '0.1', '--resume', str(run / 'last.pth.tar')])
    stored = yaml.safe_load((run / 'args.yaml').read_text())
    check_same_experiment(args.resume, stored, vars(args))  # no error: the same run
    with pytest.raises(ValueError, match=r'--seed 42 \(now 1\)'):
        check_same_experiment(args.resume, stored, dict(vars(args), seed=1))
    # a DDP run continues on as many processes: the global batch and the gates' step count depend on it
    check_same_experiment(args.resume, dict(stored, world_size=2), dict(vars(args), world_size=2))
    with pytest.raises(ValueError, match=r'world size 2 \(now 1\)'):
        check_same_experiment(args.resume, dict(stored, world_size=2), dict(vars(args), world_size=1))
