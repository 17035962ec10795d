r"""Regenerate a figure of Kingma & Welling (2013): AEVB, wake-sleep, MCEM.

  python -m experiments.figures --config=experiments/configs/figure2_frey.py --workdir=runs/fig2_frey

One config per figure (experiments/configs/figure2_frey.py, figure2_mnist.py,
figure3_mnist.py, figure4.py, figure5_mnist.py), each with smoke, cpu
(default) and paper variants; see their docstrings and REPRODUCTION.md.
Rerunning a command on the same workdir resumes an interrupted figure.
"""

from avb import cli
from avb import figures

if __name__ == "__main__":
  cli.run("experiments/configs/figure2_frey.py", figures.run_figure)
