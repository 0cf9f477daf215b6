"""Pre-training loss targets: shared captions are positives for every emoji that has them."""

import torch

from gramvl.pretrain import caption_positive_table, positive_matrix


def test_caption_positive_table_groups_identical_captions_by_concept():
    caps = ["a flag.", "flag of france", "a flag.", "flag of peru", "a dog.", "a flag."]
    owner = [0, 0, 1, 1, 2, 3]          # pairs 0..3
    concept_of_pair = [10, 11, 12, 10]  # pair 3 is another style of concept 10
    ids, members = caption_positive_table(caps, owner, concept_of_pair)
    assert ids.tolist() == [0, 1, 0, 2, 3, 0]
    assert members[0].tolist() == [10, 11] and members[1].tolist() == [10] and members[3].tolist() == [12]


def test_positive_matrix_marks_same_concept_and_shared_captions_only():
    caps = ["a flag.", "flag of france", "a flag.", "flag of peru", "a dog."]
    ids, members = caption_positive_table(caps, [0, 0, 1, 1, 2], [0, 1, 2])
    concepts = torch.tensor([0, 1, 2, 0])     # batch: images of concepts 0, 1, 2, 0
    cap_ids = ids[torch.tensor([1, 0, 4, 2])]  # texts: "flag of france", "a flag.", "a dog.", "a flag."
    pos = positive_matrix(concepts, cap_ids, members)
    expect = torch.tensor([
        [1, 1, 0, 1],  # image of concept 0: its own text, and both "a flag." texts
        [0, 1, 0, 1],  # concept 1 (peru): the "a flag." texts, not "flag of france"
        [0, 0, 1, 0],  # the dog matches only "a dog."
        [1, 1, 0, 1],
    ], dtype=torch.float32)
    assert torch.equal(pos, expect)
    concept_only = positive_matrix(concepts, cap_ids, None)
    assert torch.equal(concept_only, (concepts[:, None] == concepts[None, :]).float())
    assert concept_only[1, 3] == 0  # without caption positives "a flag." is a negative for peru
