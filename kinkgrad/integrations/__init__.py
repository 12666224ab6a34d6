"""Integrations with the tools PyTorch users train in. Each is a module of its own,
imported only when used, with its package as an optional extra:

- `kinkgrad.integrations.lightning`: `KinkCallback`, a policy and/or a watcher for a
  LightningModule, logging kink counts per step (`pip install 'kinkgrad[lightning]'`).
- TensorBoard: `Watcher.to_tensorboard` (`pip install 'kinkgrad[tensorboard]'`).
"""
