r"""Train AEVB on Frey Face (Gaussian decoder).

  python -m experiments.frey_face --config=experiments/configs/frey_face.py --workdir=runs/frey_face

See experiments/configs/frey_face.py for the variants and README.md for the
outputs.
"""

from avb import cli
from avb import train

if __name__ == "__main__":
  cli.run("experiments/configs/frey_face.py", train.train_and_evaluate)
