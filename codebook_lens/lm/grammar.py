"""The lexicon of the topic-stories grammar: generic sentences and eight topics.

Kept apart from the sampling code so that the word lists read as data. Every topic has nouns,
adjectives, actions (past-tense verb phrases) and events (what a topical thing does); the topic
classifier uses the words that occur in exactly one topic and nowhere in the generic part.
"""

from __future__ import annotations

__all__ = ["NAMES", "GENERIC", "TOPIC_LEXICON", "TOPICAL_TEMPLATES", "OPENER", "SWITCH"]

NAMES: dict[str, str] = {
    "Lily": "she",
    "Mia": "she",
    "Sara": "she",
    "Anna": "she",
    "Zoe": "she",
    "Tom": "he",
    "Ben": "he",
    "Max": "he",
    "Leo": "he",
    "Sam": "he",
}
"""Character names and their pronoun."""

OPENER = "Once upon a time, there was a {adj} {kid} named {name}."
"""The first sentence of every story (generic)."""

SWITCH = "One day, {name} {action}."
"""The sentence that introduces a topic into a story."""

GENERIC: dict[str, tuple[str, ...]] = {
    "adjs": ("little", "kind", "happy", "curious", "shy", "funny", "clever"),
    "actions": (
        "played with a red ball",
        "went to the park",
        "read a funny book",
        "drew a picture",
        "helped {poss} mom",
        "took a long nap",
        "ate an apple",
        "walked to the shop",
        "built a tower of blocks",
        "hugged {poss} teddy bear",
        "washed {poss} hands",
        "put on {poss} shoes",
    ),
    "templates": (
        "{Name} {action}.",
        "Then {pron} {action}.",
        "{Name} and {friend} {action}.",
        "{Pron} was very {adj}.",
        "{Friend} gave {obj} a big hug.",
        "They laughed together.",
        "{Pron} had a friend named {friend}.",
        "After that, {pron} {action}.",
        "{Name} smiled at {friend}.",
        "It was a {adj} day.",
    ),
}
"""Generic story material: adjectives, actions and sentence templates (no topic words)."""

TOPICAL_TEMPLATES: tuple[str, ...] = (
    "{Name} saw a {tadj} {noun}.",
    "The {noun} was {tadj} and {tadj2}.",
    "{Pron} {taction}.",
    "Then {name} {taction}.",
    "{Name} and {friend} {taction}.",
    "There was a {noun} next to the {noun2}.",
    "{Pron} loved the {tadj} {noun}.",
    "Suddenly, the {noun} {event}.",
    "{Name} would never forget the {noun}.",
)
"""Sentence templates filled with a topic's words."""

TOPIC_LEXICON: dict[str, dict[str, tuple[str, ...]]] = {
    "dragon": {
        "nouns": ("dragon", "cave", "treasure", "flame", "claw", "volcano"),
        "adjs": ("fiery", "scaly", "mighty", "smoky"),
        "actions": (
            "rode on the back of a dragon",
            "found a dragon egg",
            "hid from the dragon in a cave",
            "climbed the dragon mountain",
            "fed the baby dragon",
            "saw smoke rising from the cave",
        ),
        "events": ("breathed fire", "began to roar", "spread its wings", "guarded its gold"),
    },
    "sea": {
        "nouns": ("ocean", "ship", "wave", "shell", "whale", "beach"),
        "adjs": ("salty", "stormy", "deep", "sandy"),
        "actions": (
            "sailed a small boat",
            "swam with the dolphins",
            "collected shells on the beach",
            "watched the waves",
            "dove under the water",
            "met an old sailor",
        ),
        "events": ("crashed on the rocks", "splashed loudly", "rolled onto the beach", "drifted"),
    },
    "castle": {
        "nouns": ("castle", "king", "queen", "tower", "knight", "throne"),
        "adjs": ("royal", "grand", "noble", "ancient"),
        "actions": (
            "visited the old castle",
            "bowed to the king",
            "climbed the castle tower",
            "wore a golden crown",
            "met a brave knight",
            "walked through the castle gate",
        ),
        "events": ("echoed through the halls", "stood on the hill", "shone with jewels", "opened"),
    },
    "cooking": {
        "nouns": ("kitchen", "soup", "pan", "oven", "cake", "spoon"),
        "adjs": ("tasty", "delicious", "warm", "spicy"),
        "actions": (
            "baked a big cake",
            "stirred the soup",
            "mixed flour and sugar",
            "cut the carrots",
            "tasted the sauce",
            "washed the pots and pans",
        ),
        "events": ("smelled wonderful", "bubbled in the pot", "came out of the oven", "sizzled"),
    },
    "space": {
        "nouns": ("rocket", "star", "moon", "planet", "astronaut", "alien"),
        "adjs": ("distant", "cosmic", "silver", "glowing"),
        "actions": (
            "flew a rocket to the moon",
            "looked at the stars",
            "met a friendly alien",
            "floated in space",
            "landed on a planet",
            "wore a space suit",
        ),
        "events": ("zoomed past", "glowed in the dark", "blasted off", "twinkled above"),
    },
    "forest": {
        "nouns": ("forest", "tree", "owl", "fox", "mushroom", "squirrel"),
        "adjs": ("green", "leafy", "wild", "mossy"),
        "actions": (
            "walked into the forest",
            "climbed a tall tree",
            "picked mushrooms",
            "followed a fox",
            "heard an owl hoot",
            "built a hut of sticks",
        ),
        "events": ("rustled in the wind", "hooted softly", "ran between the trees", "hid"),
    },
    "farm": {
        "nouns": ("farm", "cow", "pig", "barn", "tractor", "horse"),
        "adjs": ("muddy", "dusty", "woolly", "noisy"),
        "actions": (
            "milked the cow",
            "fed the pigs",
            "rode the tractor",
            "stacked hay in the barn",
            "brushed the horse",
            "counted the sheep",
        ),
        "events": ("mooed loudly", "oinked in the mud", "neighed", "grazed in the field"),
    },
    "music": {
        "nouns": ("piano", "drum", "guitar", "song", "violin", "band"),
        "adjs": ("loud", "musical", "melodic", "rhythmic"),
        "actions": (
            "played the piano",
            "banged on a drum",
            "sang a song",
            "joined a band",
            "practiced the violin",
            "listened to a concert",
        ),
        "events": ("played a tune", "filled the room with music", "rang out", "sounded lovely"),
    },
}
"""Per-topic words: ``nouns``, ``adjs``, ``actions`` and ``events``."""
