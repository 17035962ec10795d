"""AEVB on MNIST: 784-500-J MLPs, Bernoulli decoder, estimator B, Adagrad.

Commands:
  python -m experiments.mnist --config=experiments/configs/mnist.py --workdir=runs/mnist
  python -m experiments.mnist --config=experiments/configs/mnist.py:latent_dim=3 --workdir=runs/mnist_z3
  python -m experiments.mnist --config=experiments/configs/mnist.py:paper --workdir=runs/mnist_paper
  python -m experiments.mnist --config=experiments/configs/mnist.py:smoke --workdir=/tmp/mnist_smoke
  python -m experiments.mnist --config=experiments/configs/mnist.py --workdir=runs/mnist_seeds \
      --config.sweep.axis=seed --config.sweep.grid="(0,1,2,3,4,5,6,7)"
  python -m experiments.mnist --config=experiments/configs/mnist.py:tpu --workdir=/mnt/shared/mnist  # every host; a shared disk
  python -m experiments.mnist --config=experiments/configs/mnist.py \
      --config.optimizer.learning_rate=0.1 --config.data.name=binarized_mnist --workdir=...

Arguments (comma-separated after the colon): latent_dim=J (default 20),
hidden=H (default 500), estimator=A|B, seed=S, and one of smoke | paper | tpu.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.aevb_config(
      arg, dataset="mnist", likelihood="bernoulli", hidden=500, latent_dim=20,
      learning_rate=0.02, cpu_steps=30_000)
