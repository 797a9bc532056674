package infermesh.prompt_class_test

import rego.v1

import data.infermesh.prompt_class

general := {"id": "g", "endpoint": {"model": "llama-3.1-8b", "safety_tier": "general"}}

strict := {"id": "s", "endpoint": {"model": "llama-3.1-70b", "safety_tier": "strict"}}

req(cls) := {"request": {"prompt_class": cls}, "candidates": [general, strict]}

test_general_prompts_reach_any_model if {
	prompt_class.allow == {"g", "s"} with input as req("general")
}

test_medical_prompts_need_strict_models if {
	prompt_class.allow == {"s"} with input as req("medical")
	prompt_class.reason.g == "medical prompts need a model of safety tier [\"strict\"]; llama-3.1-8b is general" with input as req("medical")
}

test_legal_prompts_need_strict_models if {
	prompt_class.allow == {"s"} with input as req("legal")
}

test_tiers_come_from_params if {
	prompt_class.allow == {"g"} with input as req("medical") with data.params.prompt_class_safety_tiers as {"medical": ["general"]}
}
