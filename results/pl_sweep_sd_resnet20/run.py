# issue 14: the small recorded experiment behind the recipe's p_L (cifar10_resnet20_sd)
# sd_resnet20, 10k training images, 8 epochs of the recipe's cosine schedule (no EMA: too few steps for
# decay 0.999), validated on 5,000 *held-out training* images (--val-holdout); the test split is only evaluated once at the end, as train does with a holdout.
#   python run.py P_L
import sys, json, sd_zoo
p_L = float(sys.argv[1])
res = sd_zoo.train('cifar10_resnet20_sd', dataset='', data_dir='/work/data/cifar10', epochs=8,
                   drop_path=round(1 - p_L, 3), model_ema=False, val_holdout=5000, train_subset=10000,
                   val_subset=0, output='/work/runs/pl_sweep', experiment=f'pL{sys.argv[1]}',
                   no_progress=True, log_interval=0, seed=42)
print(json.dumps(res))
