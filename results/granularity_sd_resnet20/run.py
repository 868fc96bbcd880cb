# issue 15: subset vs per-sample masking, same recipe and seed, sd_resnet20 on CIFAR-10 (20k train images, 4 epochs)
import sys, json, sd_zoo
g = sys.argv[1]
res = sd_zoo.train('cifar10_resnet20_sd', dataset='', data_dir='/work/data/cifar10', epochs=4, drop_path=0.5,
                   model_ema=False, model_kwargs={'sd_granularity': g}, train_subset=20000, val_subset=0,
                   output='/work/runs/gran', experiment=g, no_progress=True, log_interval=0, seed=42)
print(json.dumps(res))
