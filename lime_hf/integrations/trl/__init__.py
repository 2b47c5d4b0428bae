"""TRL for LIME models: `SFTTrainer` and `DPOTrainer` that keep every tag aligned with its token.

    from lime_hf.integrations.trl import LimeDPOTrainer, LimeSFTTrainer

    trainer = LimeSFTTrainer(model=model, args=SFTConfig(...), train_dataset=chats, processing_class=lime_tokenizer)

Why subclasses. TRL's own preparation keeps only `input_ids` (and the loss masks): truncation cuts `input_ids` and
`labels` alone, packing selects those two columns, the signature columns drop the rest, and its collators build
nothing else. Then its trainers patch the model's forward with a fused LM head (`add_fused_lm_head`) that runs
`model.base_model` directly: on a LIME model that is the backbone's causal LM, which neither adds the metadata
embeddings nor returns hidden states. These classes change exactly those steps and nothing else:

- dataset preparation: the `LimeTokenizer` tokenises text, chats (`apply_chat_template`: every message annotated on
  its own, the template's tokens tagged special) and prompt-completion pairs with their `<field>_ids`; labels come
  from the completion and assistant masks as in TRL; truncation cuts every column alike; packing (`bfd`,
  `bfd_split`, `wrapped`, through `trl.pack_dataset`) packs the tags alongside.
- collators: TRL's, plus the tags padded with 0 (padding-free: concatenated like `input_ids`). In a padding-free
  batch a LIME+1 model would show a document's last position the tag of the next document's first token; that tag
  is set to unknown (1), exactly what the last position of an unpacked row sees.
- the fused LM head: TRL's kernel runs on the backbone's causal LM (`model.language_model`) fed the LIME model's
  enriched `inputs_embeds`, so the log-probabilities never build the full logits and see the metadata. A model
  with tag heads also runs its heads on the same hidden states (a packed document's first position starts from the
  heads' start state) and the tag loss, weighted by `config.tag_loss_weight`, is added to TRL's loss (SFT: divided
  by the batch's label count like the LM loss; DPO: a per-batch mean). It is logged as `tag_loss`.

DPO feeds the reference model the same tags (TRL hands it every collator key), also for PEFT models, whose
reference is the model with its adapter disabled. Train LoRA with `peft_config=lime_lora_config(model)`
(`lime_hf.integrations.peft`). What these trainers refuse, with the setting to change: a tokenizer that is not a
`LimeTokenizer`, a model that is not a LIME model, vision datasets, `skip_prepare_dataset` (TRL's collators would
drop the tags), `padding_free` for DPO (TRL itself turns it off).

The package's modules: `common` (tag columns, checks, encoding, slicing and padding), `fused` (the fused LM head
and the tag loss), `sft` and `dpo` (each: dataset preparation, collator, trainer).

Needs `pip install "lime_hf[trl]"`.
"""

from .dpo import LimeDataCollatorForPreference, LimeDPOTrainer, prepare_preference_dataset
from .fused import use_lime_fused_lm_head
from .sft import LimeDataCollatorForLanguageModeling, LimeSFTTrainer, prepare_sft_dataset

__all__ = [
    "LimeDPOTrainer",
    "LimeDataCollatorForLanguageModeling",
    "LimeDataCollatorForPreference",
    "LimeSFTTrainer",
    "prepare_preference_dataset",
    "prepare_sft_dataset",
    "use_lime_fused_lm_head",
]
