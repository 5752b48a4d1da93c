"""Concept training: textual inversion with semantic inversion (anchor attraction).

Modules: `config` (the one config dataclass, cheap validation), `data` (images, augmentation bank,
cached VAE latents, prompts), `tokens` (placeholder tokens and the trainable-rows embedding),
`anchors` (anchor words, auto:K, the sparse non-negative attractor), `losses`, `loop` (training,
checkpoints, resume), `artifact` (writer and `load_concepts`), `analysis`, `plot`.
"""
