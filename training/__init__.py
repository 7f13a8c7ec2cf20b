"""Training: dataset split, frozen-backbone features, heads, int8 export, evaluation."""
