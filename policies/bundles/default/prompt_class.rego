# Safety: a prompt class listed in params.prompt_class_safety_tiers may only reach models of
# those safety tiers (medical and legal prompts need "strict" models). Other classes go anywhere.
package infermesh.prompt_class

import rego.v1

# Why endpoint ep may not serve request req (empty: it may). A function of its arguments only,
# so prompt_class_test.rego can call it directly.
tier_violations(req, ep, params) := {msg |
	tiers := params.prompt_class_safety_tiers[req.prompt_class]
	not ep.safety_tier in tiers
	msg := sprintf("%s prompts need a model of safety tier %v; %s is %s",
		[req.prompt_class, tiers, ep.model, ep.safety_tier])
}

violation[c.id] := concat("; ", sort(msgs)) if {
	some c in input.candidates
	msgs := tier_violations(input.request, c.endpoint, data.params)
	count(msgs) > 0
}

allow contains c.id if {
	some c in input.candidates
	not violation[c.id]
}

reason := violation
