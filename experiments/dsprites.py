r"""Train a beta-VAE or a capacity-annealed beta-VAE on dSprites, then score it.

  python -m experiments.dsprites --config=experiments/configs/beta_vae_dsprites.py:cpu --workdir=runs/beta_vae_dsprites_cpu
  python -m experiments.dsprites --config=experiments/configs/capacity_dsprites.py:cpu --workdir=runs/capacity_dsprites_cpu

See the two config files for the variants (:smoke, :cpu, :paper) and
REPRODUCTION.md for the measured numbers.
"""

from avb import cli
from avb import dsprites_experiment

if __name__ == "__main__":
  cli.run("experiments/configs/beta_vae_dsprites.py",
          dsprites_experiment.train_and_evaluate,
          validate=dsprites_experiment.validate_config)
