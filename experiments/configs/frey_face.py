"""AEVB on Frey Face: 560-200-J MLPs, Gaussian decoder, estimator B, Adagrad.

The decoder outputs a per-pixel mean through a sigmoid and a free per-pixel
log-variance (paper, appendix C). Frey Face has 1,965 images: 1,765 train and
a fixed 200 test (see avb/data.py).

Commands:
  python -m experiments.frey_face --config=experiments/configs/frey_face.py --workdir=runs/frey_face
  python -m experiments.frey_face --config=experiments/configs/frey_face.py:latent_dim=2 --workdir=runs/frey_z2
  python -m experiments.frey_face --config=experiments/configs/frey_face.py:paper --workdir=runs/frey_paper
  python -m experiments.frey_face --config=experiments/configs/frey_face.py:smoke --workdir=/tmp/frey_smoke
  python -m experiments.frey_face --config=experiments/configs/frey_face.py --workdir=runs/frey_face_seeds \
      --config.sweep.axis=seed --config.sweep.grid="(0,1,2,3,4,5,6,7)"
  python -m experiments.frey_face --config=experiments/configs/frey_face.py:tpu --workdir=/mnt/shared/frey_face  # every host; a shared disk

Arguments (comma-separated after the colon): latent_dim=J (default 10),
hidden=H (default 200), estimator=A|B, seed=S, and one of smoke | paper | tpu.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.aevb_config(
      arg, dataset="frey_face", likelihood="gaussian", hidden=200,
      latent_dim=10, learning_rate=0.01, cpu_steps=100_000, eval_batch_size=200,
      num_images=32)
