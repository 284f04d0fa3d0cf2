"""Student training: `config` (TrainConfig -> TrainingArguments), `data` (dataset and collator),
`trainer` (DistillationTrainer), `checkpoints` (resume), `run` (train_student)."""
