"""Segmentation on top of the federated engine: the U-Net's task (loss,
per-example gradients, augmentation), its evaluation (Dice, IoU, HD95 per
site and modality) and non-private centralised training."""
