r"""A conditional VAE and a regressor completing MNIST digits from a visible region.

  python -m experiments.cvae --config=experiments/configs/cvae.py:cpu --workdir=runs/cvae

Writes cvae_completions.png and summary.json (log p(x|c) of both models on
held-out digits) to the workdir. See experiments/configs/cvae.py for the
variants and avb/cvae.py for the models.
"""

from avb import cli
from avb import cvae

if __name__ == "__main__":
  cli.run("experiments/configs/cvae.py", cvae.run)
