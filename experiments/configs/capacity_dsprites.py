r"""Capacity-annealed beta-VAE on dSprites (Burgess et al. 2018).

loss = reconstruction + gamma * |KL - C|, C rising linearly from 0 to C_max
nats over `objective.capacity_steps` steps, then held (avb/objectives.py).

Commands:
  python -m experiments.dsprites --config=experiments/configs/capacity_dsprites.py:cpu --workdir=runs/capacity_dsprites_cpu
  python -m experiments.dsprites --config=experiments/configs/capacity_dsprites.py:paper --workdir=runs/capacity_dsprites_paper
  python -m experiments.dsprites --config=experiments/configs/capacity_dsprites.py:smoke --workdir=/tmp/capacity_smoke
  python -m experiments.dsprites --config=experiments/configs/capacity_dsprites.py:paper,capacity_max=35 --workdir=runs/capacity_c35

Variants (one of them, with arguments, comma-separated after the colon):
  * `cpu` (the default): the claim of Burgess et al. at 2-core CPU scale:
    latents switch on one after another as C grows (images/kl_per_latent.png
    of each run, "switch_on" in its summary.json). A 4096-256-256-10 ReLU
    MLP, Adam 1e-3, gamma = 1000, C to 25 nats over 16,000 steps, 20,000
    steps, 2 seeds in one vmapped program. See REPRODUCTION.md.
  * `paper`: Burgess et al.'s set-up (appendix A.1): the convolutional
    encoder/decoder (4 x conv 32 x 4x4 stride 2, FC 256, 256, 10 latents,
    Bernoulli decoder; `model.architecture=conv`), gamma = 1000, C_max = 25
    nats reached after 100,000 steps, Adam with learning rate 5e-4, batch
    64, 300,000 steps.
  * `smoke`: seconds, as in beta_vae_dsprites.py, with a gamma x seed sweep.

Arguments: gamma=G (default 1000), capacity_max=C (default 25),
capacity_steps=N (default 100000), latent_dim=J (default 10), seed=S.
"""

from experiments.configs import beta_vae_dsprites


def get_config(arg=None):
  return beta_vae_dsprites.dsprites_config(arg, "capacity")
