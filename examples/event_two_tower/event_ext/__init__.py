"""An example posttrain extension, used only through the config (no edit inside posttrain/):

- `event_ext.model:MODEL_SPEC`  a model family: the shared decoder with a second output head that classifies
                                the category of the next event (model.name),
- `event_ext.loss:two_head_loss` next-event cross-entropy + weighted category cross-entropy (training.loss),
- `event_ext.data:skip_cold_start` a row format that does not train on a user's first events (data.format),
- `event_ext.recipe:run`         the SFT core, then a held-out evaluation of both heads (job.recipe).

Put `examples/event_two_tower` on PYTHONPATH and run `python train.py --config examples/event_two_tower/config.toml`.
"""
