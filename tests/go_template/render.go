// Renders a chat template the way Ollama does: Go's text/template over the chat's messages.
// Input (stdin): {"template": "...", "messages": [{"role": "...", "content": "..."}]}.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	Messages []Message
}

func main() {
	var in struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(in.Template))
	if err := tmpl.Execute(os.Stdout, Values{Messages: in.Messages}); err != nil {
		panic(err)
	}
}
