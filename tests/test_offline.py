"""The one offline check (`ilr.offline.hub_offline`): the variables read as huggingface_hub and datasets read them."""

import pytest

from ilr.offline import hub_offline


VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def environment(monkeypatch):
    """Only the variables a case sets, and the imported libraries' own flags off."""
    import datasets.config
    from huggingface_hub import constants

    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return monkeypatch


@pytest.mark.parametrize(
    ("variables", "hub", "for_datasets"),
    [
        ({}, False, False),
        ({"HF_HUB_OFFLINE": "1"}, True, True),
        ({"HF_HUB_OFFLINE": "yes"}, True, True),
        ({"TRANSFORMERS_OFFLINE": "1"}, True, True),  # huggingface_hub's fallback
        ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False, False),  # set: HF_HUB_OFFLINE decides
        ({"HF_DATASETS_OFFLINE": "1"}, False, True),  # datasets only: models and pushes still reach the Hub
        ({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "0"}, True, False),  # datasets' own variable wins there
    ],
)
def test_variables_mean_what_the_libraries_make_of_them(environment, variables, hub, for_datasets):
    for name, value in variables.items():
        environment.setenv(name, value)
    assert hub_offline() is hub
    assert hub_offline("datasets") is for_datasets


def test_a_library_flag_set_in_code_counts(environment):
    from huggingface_hub import constants

    environment.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_offline() and hub_offline("datasets") is False  # datasets keeps its own copy, read at its import
    with pytest.raises(ValueError, match="library must be"):
        hub_offline("transformers")
