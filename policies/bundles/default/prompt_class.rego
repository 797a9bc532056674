# Safety: a prompt class listed in params.prompt_class_safety_tiers may only reach models of
# those safety tiers (medical and legal prompts need "strict" models). Other classes go anywhere.
package infermesh.prompt_class

import rego.v1

violation[c.id] := msg if {
	some c in input.candidates
	tiers := data.params.prompt_class_safety_tiers[input.request.prompt_class]
	not c.endpoint.safety_tier in tiers
	msg := sprintf("%s prompts need a model of safety tier %v; %s is %s",
		[input.request.prompt_class, tiers, c.endpoint.model, c.endpoint.safety_tier])
}

allow contains c.id if {
	some c in input.candidates
	not violation[c.id]
}

reason := violation
