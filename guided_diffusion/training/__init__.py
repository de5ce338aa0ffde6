"""Training: the loop (``train_util``), the objectives it runs (``objectives``), the settings built from the flags
(``settings``) and the run they start (``run``); the command lines are ``anofpdm train`` / ``train-classifier``
(``commands/``)."""
