"""The student side: BERT model, data loading from codes.h5, objectives and the training loop."""
