"""Score-function vs reparameterized gradient variance along an AEVB run on MNIST.

The VAE (784-500-J MLPs, Bernoulli decoder) trains with AEVB as usual
(estimator B, reparameterized, Adagrad); at log-spaced steps the per-example
gradients of the ELBO with respect to the encoder's parameters are measured
on a fixed minibatch with four estimators at equal L (see
avb/gradient_variance.py).

Commands:
  python -m experiments.gradient_variance --config=experiments/configs/gradient_variance.py:cpu --workdir=runs/gradient_variance
  python -m experiments.gradient_variance --config=experiments/configs/gradient_variance.py:paper --workdir=runs/gradient_variance_paper
  python -m experiments.gradient_variance --config=experiments/configs/gradient_variance.py:smoke --workdir=/tmp/gradient_variance_smoke
  python -m experiments.gradient_variance --config=experiments/configs/gradient_variance.py:cpu \
      --config.variance.num_samples="(1,100)" --config.variance.num_draws=64 --workdir=runs/gv_l100

Arguments (comma-separated after the colon): one of smoke | cpu (the
default) | paper, latent_dim=J (default 20), hidden=H (default 500), seed=S.

  * cpu: 10^4 training steps of 100 (10^6 examples, about 1.5 minutes on 2
    cores); measurements at step 0 and 10 log-spaced steps, on a fixed
    minibatch of B = 64 training digits, N = 32 estimates per example, L in
    (1, 10); about 5 minutes in all on a 2-core CPU.
  * paper: the same model trained for 10^5 steps (10^7 examples); step 0
    and 14 log-spaced measurements, B = 100, N = 100.
  * smoke: a tiny model, 30 steps, L = 2; seconds.
"""

import ml_collections

from avb import config_utils
from experiments.configs import common


def get_config(arg=None):
  args = config_utils.parse_arg(arg, smoke=False, cpu=False, paper=False,
                                latent_dim=20, hidden=500, seed=0)
  if args.smoke + args.cpu + args.paper > 1:
    raise config_utils.ConfigError(
        "choose one of :smoke, :cpu and :paper, not several")
  base_arg = f"latent_dim={args.latent_dim},hidden={args.hidden},seed={args.seed}"
  if args.smoke:
    base_arg += ",smoke"
  config = common.aevb_config(
      base_arg, dataset="mnist", likelihood="bernoulli", hidden=500,
      latent_dim=20, learning_rate=0.02, cpu_steps=10_000)

  with config.unlocked():
    # Only the test ELBO at each measurement is evaluated; no importance-
    # sampled log-likelihood.
    config.eval.log_likelihood_samples = 0
    config.training.checkpoint_every = config.training.num_steps
    config.training.eval_every = config.training.num_steps

    config.variance = ml_collections.ConfigDict()
    # Which gradient estimators of the encoder's parameters to compare (see
    # avb/gradient_variance.py); the leave-one-out one needs L >= 2.
    config.variance.estimators = ("reparameterized", "score_function",
                                  "score_function_mean_baseline",
                                  "score_function_leave_one_out")
    config.variance.num_samples = (1, 10)  # L values, the same for all
    config.variance.num_draws = 32  # N estimates per example
    config.variance.batch_size = 64  # B, the fixed minibatch of training digits
    config.variance.num_points = 10  # log-spaced steps in [1, num_steps], + 0
    config.variance.baseline_samples = 16  # draws per example for the mean baseline
    config.variance.eval_examples = 2000  # test ELBO on this many test images

    if args.paper:
      config.training.num_steps = 100_000
      config.training.log_every = 1000
      config.training.checkpoint_every = 100_000
      config.training.eval_every = 100_000
      config.variance.num_points = 14
      config.variance.num_draws = 100
      config.variance.batch_size = 100
      config.variance.eval_examples = 10_000
    if args.smoke:
      config.variance.num_samples = (2,)
      config.variance.num_draws = 8
      config.variance.batch_size = 16
      config.variance.num_points = 3
      config.variance.baseline_samples = 4
      config.variance.eval_examples = 160
      # Log-spaced stops: one step per dispatch compiles a single program.
      config.training.steps_per_call = 1
  return config
