"""sd-zoo's atomic checkpoint saver keeps the files timm's CheckpointSaver keeps, with timm's entries and
bookkeeping, so a run folder resumes under either."""
import argparse
import os

import pytest
import torch
from timm.task import ClassificationTask
from timm.utils import CheckpointSaver, load_checkpoint_metadata

from sd_zoo.checkpoints import AtomicCheckpointSaver

METRICS = [50.0, 40.0, 60.0, None, 60.0, 55.0, 70.0, 10.0, None, 65.0]


def _parts(folder):
    model = torch.nn.Linear(3, 2)
    task = ClassificationTask(model=model, criterion=torch.nn.CrossEntropyLoss(), device=torch.device('cpu'),
                              verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    task.model_ref = model
    return task, optimizer, argparse.Namespace(model='sd_resnet20')


def _kept(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith('.pth.tar') and n != 'tmp.pth.tar')


@pytest.mark.parametrize('decreasing', [False, True])
def test_the_same_files_and_bookkeeping_as_timms_saver(tmp_path, decreasing):
    ours, theirs = tmp_path / 'ours', tmp_path / 'theirs'
    ours.mkdir(), theirs.mkdir()
    task, optimizer, args = _parts(ours)
    saver = AtomicCheckpointSaver(ours, task=task, optimizer=optimizer, args=args, decreasing=decreasing,
                                  max_history=3)
    timm_saver = CheckpointSaver(model=task.model_ref, optimizer=optimizer, args=args, checkpoint_dir=str(theirs),
                                 recovery_dir=str(theirs), decreasing=decreasing, max_history=3, task=task)
    for epoch, metric in enumerate(METRICS):
        saver.save_checkpoint(epoch, metric)
        timm_saver.save_checkpoint(epoch, metric)
        assert _kept(ours) == _kept(theirs), epoch
        assert (saver.best_epoch, saver.best_metric) == (timm_saver.best_epoch, timm_saver.best_metric)
        mine, timms = load_checkpoint_metadata(str(ours / 'last.pth.tar')), \
            load_checkpoint_metadata(str(theirs / 'last.pth.tar'))
        assert sorted(mine) == sorted(timms) and mine['saver'] == timms['saver'], epoch
    best = load_checkpoint_metadata(str(ours / 'model_best.pth.tar'))
    assert best['epoch'] == saver.best_epoch and best['metric'] == saver.best_metric
    # a resume restores the bookkeeping from the checkpoint: ours reads timm's, timm's reads ours
    again = AtomicCheckpointSaver(theirs, task=task, optimizer=optimizer, args=args, decreasing=decreasing,
                                  max_history=3)
    again.load_state_dict(load_checkpoint_metadata(str(theirs / 'last.pth.tar'))['saver'])
    timm_again = CheckpointSaver(model=task.model_ref, optimizer=optimizer, args=args, checkpoint_dir=str(ours),
                                 recovery_dir=str(ours), decreasing=decreasing, max_history=3, task=task)
    timm_again.load_state_dict_from_checkpoint(str(ours / 'last.pth.tar'))
    assert again.files == [(os.path.basename(f), m) for f, m in timm_again.checkpoint_files]
    assert (again.best_epoch, again.best_metric) == (timm_again.best_epoch, timm_again.best_metric)


def test_a_kill_before_the_best_copy_is_repaired_on_resume(tmp_path):
    task, optimizer, args = _parts(tmp_path)
    saver = AtomicCheckpointSaver(tmp_path, task=task, optimizer=optimizer, args=args, max_history=3)
    saver.save_checkpoint(0, 10.0)
    saver.save_checkpoint(1, 20.0)
    os.link(tmp_path / 'checkpoint-0.pth.tar', tmp_path / 'stale')
    os.replace(tmp_path / 'stale', tmp_path / 'model_best.pth.tar')  # as if epoch 1's copy never came
    resumed = AtomicCheckpointSaver(tmp_path, task=task, optimizer=optimizer, args=args, max_history=3)
    resumed.load_state_dict(load_checkpoint_metadata(str(tmp_path / 'last.pth.tar'))['saver'])
    assert load_checkpoint_metadata(str(tmp_path / 'model_best.pth.tar'))['epoch'] == 1 == resumed.best_epoch


def test_a_kill_before_the_numbered_copy_still_ranks_that_epoch_on_resume(tmp_path):
    task, optimizer, args = _parts(tmp_path)
    saver = AtomicCheckpointSaver(tmp_path, task=task, optimizer=optimizer, args=args, max_history=3)
    saver.save_checkpoint(0, 10.0)
    saver.save_checkpoint(1, 20.0)  # the best epoch, killed before its numbered and best copies
    (tmp_path / 'checkpoint-1.pth.tar').unlink()
    os.link(tmp_path / 'checkpoint-0.pth.tar', tmp_path / 'stale')
    os.replace(tmp_path / 'stale', tmp_path / 'model_best.pth.tar')
    resumed = AtomicCheckpointSaver(tmp_path, task=task, optimizer=optimizer, args=args, max_history=3)
    resumed.load_state_dict(load_checkpoint_metadata(str(tmp_path / 'last.pth.tar'))['saver'])
    assert (resumed.best_epoch, resumed.best_metric) == (1, 20.0)
    assert resumed.files == [('checkpoint-1.pth.tar', 20.0), ('checkpoint-0.pth.tar', 10.0)]
    for name in ('checkpoint-1.pth.tar', 'model_best.pth.tar'):
        assert load_checkpoint_metadata(str(tmp_path / name))['epoch'] == 1


def test_a_tampered_record_never_names_another_file_to_evict(tmp_path):
    task, optimizer, args = _parts(tmp_path)
    (tmp_path / 'args.yaml').write_text('model: sd_resnet20\n')
    saver = AtomicCheckpointSaver(tmp_path, task=task, optimizer=optimizer, args=args, max_history=1)
    saver.load_state_dict(dict(checkpoint_files=[('args.yaml', 1.0), ('../elsewhere', 0.5)], best_epoch=None,
                               best_metric=None, pending=(None, None)))
    assert saver.files == []
    saver.save_checkpoint(0, 5.0)
    saver.save_checkpoint(1, 6.0)  # evicts checkpoint-0 only
    assert (tmp_path / 'args.yaml').exists() and _kept(tmp_path) == ['checkpoint-1.pth.tar', 'last.pth.tar',
                                                                      'model_best.pth.tar']


def test_a_nan_metric_ranks_as_none_and_a_damaged_record_is_refused(tmp_path):
    task, optimizer, args = _parts(tmp_path)
    saver = AtomicCheckpointSaver(tmp_path, task=task, optimizer=optimizer, args=args, max_history=2)
    for epoch, metric in enumerate([10.0, float('nan'), 20.0]):  # a NaN compares with nothing: never the worst
        saver.save_checkpoint(epoch, metric)
    assert (saver.best_epoch, saver.best_metric) == (2, 20.0)
    assert load_checkpoint_metadata(str(tmp_path / 'model_best.pth.tar'))['epoch'] == 2
    for damaged in (dict(checkpoint_files=[('checkpoint-0.pth.tar', 'high')]), dict(best_epoch=-1),
                    dict(pending=(True, 1.0)), dict(checkpoint_files='checkpoint-0.pth.tar')):
        with pytest.raises(ValueError, match="the checkpoint's saver record .* is damaged"):
            saver.load_state_dict(dict(dict(checkpoint_files=[], best_epoch=None, best_metric=None,
                                            pending=(None, None)), **damaged))
