"""The pan-organ model: organ tokenizers, the transformer backbone, DEX layers and heads."""
