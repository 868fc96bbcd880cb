# issue 15, second comparison: subset vs per-sample masking, same recipe, two seeds each
# sd_resnet20 on CIFAR-10 (20k train images, 8 epochs of cosine lr to 0, p_L 0.5, no EMA), full test split.
#   python run_long.py MODE SEED     (MODE: subset | sample)
import sys, json, sd_zoo
mode, seed = sys.argv[1], int(sys.argv[2])
res = sd_zoo.train('cifar10_resnet20_sd', dataset='', data_dir='/work/data/cifar10', epochs=8, drop_path=0.5,
                   model_ema=False, model_kwargs={'sd_granularity': mode}, train_subset=20000, val_subset=0,
                   output='/work/runs/gran_long', experiment=f'{mode}_s{seed}', no_progress=True,
                   log_interval=0, seed=seed)
print(json.dumps(res))
