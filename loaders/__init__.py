"""rbe_loaders: load rbe containers into frameworks; imports only ``rbeformat`` of this project.

Installed as ``rbe_loaders`` (from the repository's ``loaders/`` folder).
``rbe_loaders.torch`` saves torch tensors (``save_file``) and loads them back
(``load_file``, ``load_state_dict``), as ``safetensors.torch`` does, and loads a
whole transformers model whose quantized weights stay compressed (``load_model``,
``save_model``: ``rbe_loaders.torch.model``, with one decoder module per codec in
``rbe_loaders.torch.decoders``, chosen by the decode formula the codec declares).
``rbe_loaders.ort`` opens a container converted from ONNX as an ONNX Runtime
session whose quantized weights stay compressed (``session``, ``on_the_fly_model``;
one rewriter module per codec in ``rbe_loaders.ort.rewriters``, chosen the same way).
``rbe_loaders.ort.graph`` reads the ONNX graph a container carries and which tensor
fills each initializer; ``rbe_loaders.tokenizer(path)`` gives the ``tokenizers.Tokenizer``
of the container's ``tokenizer.json``; ``rbe_loaders.ort.run`` embeds texts and generates with a
container converted with ``--onnx`` (``embed``, ``generate``, ``token_logprobs``), every call into ONNX
Runtime and tokenizers stoppable, time-limited and failing as rbe errors (``rbe_loaders.ort.guard``).
Importing this package imports no framework.
"""

TOKENIZER_FILE = "tokenizer.json"  # where a Hugging Face directory keeps its fast tokenizer


def tokenizer(path):
    """The ``tokenizers.Tokenizer`` built from the ``tokenizer.json`` embedded in the rbe file at ``path``.

    A model directory's files are embedded under their relative paths (``rbe convert DIR``);
    UsageError when the container holds no ``tokenizer.json``.
    """
    from rbeformat import FormatError, Reader, UsageError
    from rbeformat.extras import TOKENIZERS

    (tokenizers,) = TOKENIZERS.require()
    with Reader(path) as r:
        if TOKENIZER_FILE not in r.files():
            raise UsageError(
                f"{path}: holds no {TOKENIZER_FILE} (convert the model's directory with its tokenizer files in "
                "it, or an .onnx file with --tokenizer)"
            )
        data = r.read_file(TOKENIZER_FILE)
    try:
        return tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exceptions for JSON it cannot read
        raise FormatError(
            f"{path}: the embedded {TOKENIZER_FILE} is not a valid tokenizer ({str(exc)[:100]})"
        ) from None
