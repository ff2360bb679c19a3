// render_ollama_template renders an Ollama Modelfile TEMPLATE the way Ollama's chat endpoint does,
// with Go's text/template (the engine Ollama uses), for ftlib's tests.
//
//	echo '{"template": "...", "system": "...", "messages": [{"role": "user", "content": "hi"}]}' |
//	    go run tests/tools/render_ollama_template.go
//
// What it reproduces from Ollama (server/routes.go ChatHandler, template/template.go Execute):
//   - the Modelfile's SYSTEM becomes a leading system message when the request's first message is
//     not a system message;
//   - collate: consecutive messages of the same role are merged with "\n\n", and every system
//     message's content is joined with "\n\n" into .System (system messages stay in .Messages);
//   - the template is executed with .System, .Messages (.Role, .Content), .Prompt and .Response
//     (empty on the chat path; Ollama's legacy path for templates without .Messages is not needed).
//
// Only the standard library: it runs with Debian's golang-go and no module downloads.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "render_ollama_template: bad input:", err)
		os.Exit(2)
	}
	msgs := in.Messages
	if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
	}
	system, collated := collate(msgs)
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render_ollama_template: template does not parse:", err)
		os.Exit(3)
	}
	vars := map[string]any{"System": system, "Messages": collated, "Prompt": "", "Response": ""}
	if err := tmpl.Execute(os.Stdout, vars); err != nil {
		fmt.Fprintln(os.Stderr, "render_ollama_template: execute:", err)
		os.Exit(4)
	}
}
