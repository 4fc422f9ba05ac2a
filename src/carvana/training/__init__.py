"""Training: the loops, their losses and metrics, callbacks, checkpoints and torchrun glue.

  callbacks         - the callback protocol (every hook a documented no-op)
  distributed       - torch.distributed glue (no-ops in a single process)
  losses            - BCE + Dice loss and the competition Dice metric
  tasks             - the task every classifier delegates to: BinaryTask (Carvana), MultiClassTask (CE + Dice, IoU)
  checkpoint        - atomic last/best checkpoints that describe their model
  optim             - optimiser and LR-schedule factories by name
  inference         - CPU eval copies (BatchNorm folded, weights cast once, pools without indices); eval_logits
  streams           - CPU evaluation streams: one batch per core at once, results in order
  evaluation        - the binary validation and the prediction loop (functions of the trainer)
  epoch             - the steps of one training epoch (a function of the trainer, as evaluation's are)
  averaging         - --ema: an exponential moving average of the weights and BatchNorm statistics
  classifier        - CarvanaClassifier: the training loop; epoch steps, validate / predict delegate
  logging_callbacks - console line, metrics.csv, TensorBoard, preview PNGs

Imports carvana.data and carvana.models only.
"""
