"""Model packages (``models/NAME/``): the card and the framework profiles' parameters, light
enough for every process that loads cards (rules name models and bind series to their
inputs); the numerics that run them are ``dicomnode.inference``."""
