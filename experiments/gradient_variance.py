r"""Score-function vs reparameterized gradient variance along an AEVB training run.

  python -m experiments.gradient_variance --config=experiments/configs/gradient_variance.py:cpu --workdir=runs/gradient_variance

Writes gradient_variance.csv, gradient_variance.png and summary.json to the
workdir. See experiments/configs/gradient_variance.py for the variants and
avb/gradient_variance.py for what is measured.
"""

from avb import cli
from avb import gradient_variance

if __name__ == "__main__":
  cli.run("experiments/configs/gradient_variance.py", gradient_variance.run_study)
