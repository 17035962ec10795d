r"""Train AEVB on MNIST.

  python -m experiments.mnist --config=experiments/configs/mnist.py --workdir=runs/mnist

See experiments/configs/mnist.py for the variants (:latent_dim=3, :smoke,
:paper) and README.md for the outputs.
"""

from avb import cli
from avb import train

if __name__ == "__main__":
  cli.run("experiments/configs/mnist.py", train.train_and_evaluate)
