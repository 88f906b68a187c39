#include "instantiate_markov_draft.h"
