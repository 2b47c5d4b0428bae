"""Model card templates, installed as the package `lime_hf.model_cards` (see `lime_hf.model_card`)."""
