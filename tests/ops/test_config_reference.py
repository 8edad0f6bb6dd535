from infra.config import schema
from ops.config_reference import README, section


def test_readme_config_reference_is_in_sync_with_pulumi_yaml() -> None:
    assert section() in README.read_text(), "run: python -m ops.config_reference --write"


def test_reference_lists_every_key() -> None:
    text = section()
    assert all(f"`llm-platform:{name}`" in text for name in schema())
