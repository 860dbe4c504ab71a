"""The 3D half: tabletop scenes of a World (scenes/world.py) and the models that invert them.

The 2D half (AIR and DAIR on multi-MNIST: `inverse_graphics.air`, `.modules`, `.train`) and this one share the
core: estimators (`inverse_graphics.estimators`), the recurrence (`inverse_graphics.modules.GatedRecurrence`), the
training engine (`inverse_graphics.engine`), checkpoints (`inverse_graphics.checkpoint`) and the CLI.

Here:
- `air3d`: 3D AIR, the renderer as the generative model; `air3d_objective`: its ELBO and sleep phase;
  `modules3d`: its networks; `appearance`: the per-image light/exposure latent; `train_air3d`: its training recipe.
- `supervised3d`, `train_supervised3d`: the supervised regressor baseline.
- `refine`, `levenberg_marquardt`: render-and-compare refinement of any method's scenes.
- `world3d`: what a model takes from its World (derived scales, renderers, count prior, clamping); `data3d`:
  labelled renders; `metrics3d`: matching, count / identity / pose errors, MSSD.
"""
