package infermesh.prompt_class_test

import rego.v1

import data.infermesh.prompt_class

params := {"prompt_class_safety_tiers": {"medical": ["strict"], "legal": ["strict"]}}

general_model := {"model": "llama-3.1-8b", "safety_tier": "general"}

strict_model := {"model": "llama-3.1-70b", "safety_tier": "strict"}

test_medical_prompts_need_a_strict_model if {
	count(prompt_class.tier_violations({"prompt_class": "medical"}, general_model, params)) == 1
	count(prompt_class.tier_violations({"prompt_class": "medical"}, strict_model, params)) == 0
}

test_legal_prompts_need_a_strict_model if {
	count(prompt_class.tier_violations({"prompt_class": "legal"}, general_model, params)) == 1
}

test_unlisted_classes_go_anywhere if {
	count(prompt_class.tier_violations({"prompt_class": "general"}, general_model, params)) == 0
	count(prompt_class.tier_violations({"prompt_class": "code"}, strict_model, params)) == 0
}
