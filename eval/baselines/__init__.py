"""What a VLM must beat on a data set: question-only and small-CNN baselines, and linear probes of a frozen encoder."""
