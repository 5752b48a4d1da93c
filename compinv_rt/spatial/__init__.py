"""Spatial inversion: layouts per concept and the two ways to enforce them.

layouts.py      `--layout` text, concept phrases and their token positions, fixed boxes
bias_maps.py    layouts -> `attention_bias` maps (+s inside, -s outside) at latent resolution, and
                the adaptive bias's per-step gain schedule (`bias_gain`)
attention.py    the bias processor (fixed, or scaled by each layer's logit spread in the graph)
                and the BiasedUNet wrapper shared with the export stage
capture.py      recording cross-attention probabilities (guidance, heatmaps)
guidance.py     backward layout guidance as a latent hook of the one denoise loop (PyTorch only)
heatmaps.py     per-token attention maps: recorder, PNG grid, box read-out
layout_model.py the layout MLP (prompt states + concept tokens + following words -> boxes)
layout_data.py  layouts to learn from: shapes-world ground truth or the model's own attention
plan.py         `generate`'s spatial options -> pipeline inputs
"""
