"""Output formats: each module is a table of output tensor names plus a config builder."""


def output_architectures() -> tuple[str, ...]:
    """Every architecture mergekit-mode writes: the one list that says what our outputs are
    (export-gguf converts only these). A registry of formats supplies it when there is one."""
    from mergekit_mode.formats import mixtral

    return (mixtral.ARCHITECTURE,)
