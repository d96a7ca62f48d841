/**
 * Just enough of the DOM for react-dom's client renderer to mount, update and unmount a component in Node, and for a
 * test to act as a user on it (type into an input, submit a form) through real DOM events that bubble to React's
 * root listeners. Elements, text nodes, attributes, listeners with capture and bubble phases; no layout, no
 * selection, no CSS. Install it before react-dom is first imported (react-dom looks for `window.document` once).
 */

type Listener = { fn: (event: DomEvent) => void; capture: boolean };

export class DomEvent {
  readonly bubbles: boolean;
  readonly cancelable: boolean;
  readonly timeStamp = performance.now();
  readonly isTrusted = true;
  target: DomNode | null = null;
  currentTarget: DomNode | null = null;
  eventPhase = 0;
  defaultPrevented = false;
  private stopped = false;

  constructor(
    readonly type: string,
    init: { bubbles?: boolean; cancelable?: boolean } = {},
  ) {
    this.bubbles = init.bubbles ?? false;
    this.cancelable = init.cancelable ?? false;
  }

  preventDefault(): void {
    if (this.cancelable) this.defaultPrevented = true;
  }

  stopPropagation(): void {
    this.stopped = true;
  }

  get propagationStopped(): boolean {
    return this.stopped;
  }
}

export class DomNode {
  parentNode: DomNode | null = null;
  readonly childNodes: DomNode[] = [];
  private readonly listeners = new Map<string, Listener[]>();

  constructor(
    readonly nodeType: number,
    readonly nodeName: string,
    public ownerDocument: DomDocument | null,
  ) {}

  get firstChild(): DomNode | null {
    return this.childNodes[0] ?? null;
  }
  get lastChild(): DomNode | null {
    return this.childNodes.at(-1) ?? null;
  }
  get nextSibling(): DomNode | null {
    const siblings = this.parentNode?.childNodes;
    return siblings?.[siblings.indexOf(this) + 1] ?? null;
  }
  get previousSibling(): DomNode | null {
    const siblings = this.parentNode?.childNodes;
    const at = siblings?.indexOf(this) ?? -1;
    return at > 0 ? (siblings?.[at - 1] ?? null) : null;
  }

  appendChild<T extends DomNode>(child: T): T {
    child.parentNode?.removeChild(child);
    this.childNodes.push(child);
    child.parentNode = this;
    return child;
  }

  insertBefore<T extends DomNode>(child: T, before: DomNode | null): T {
    if (before === null) return this.appendChild(child);
    child.parentNode?.removeChild(child);
    const at = this.childNodes.indexOf(before);
    if (at < 0) throw new Error('insertBefore: the reference node is not a child');
    this.childNodes.splice(at, 0, child);
    child.parentNode = this;
    return child;
  }

  removeChild<T extends DomNode>(child: T): T {
    const at = this.childNodes.indexOf(child);
    if (at < 0) throw new Error('removeChild: not a child');
    this.childNodes.splice(at, 1);
    child.parentNode = null;
    return child;
  }

  contains(other: DomNode | null): boolean {
    for (let n = other; n !== null; n = n.parentNode) if (n === this) return true;
    return false;
  }

  get textContent(): string {
    return this.childNodes.map((c) => c.textContent).join('');
  }
  set textContent(text: string) {
    for (const c of [...this.childNodes]) this.removeChild(c);
    if (text !== '' && this.ownerDocument !== null) this.appendChild(this.ownerDocument.createTextNode(text));
  }

  addEventListener(type: string, fn: (event: DomEvent) => void, options?: boolean | { capture?: boolean }): void {
    const capture = typeof options === 'boolean' ? options : (options?.capture ?? false);
    const list = this.listeners.get(type) ?? [];
    if (!list.some((l) => l.fn === fn && l.capture === capture)) list.push({ fn, capture });
    this.listeners.set(type, list);
  }

  removeEventListener(type: string, fn: (event: DomEvent) => void, options?: boolean | { capture?: boolean }): void {
    const capture = typeof options === 'boolean' ? options : (options?.capture ?? false);
    this.listeners.set(
      type,
      (this.listeners.get(type) ?? []).filter((l) => l.fn !== fn || l.capture !== capture),
    );
  }

  /** Capture from the top down to the target, then bubble back up (when the event bubbles), as a browser does. */
  dispatchEvent(event: DomEvent): boolean {
    event.target = this;
    const path: DomNode[] = [];
    for (let n: DomNode | null = this; n !== null; n = n.parentNode) path.push(n);
    const run = (node: DomNode, capture: boolean, phase: number) => {
      event.currentTarget = node;
      event.eventPhase = phase;
      for (const l of [...(node.listeners.get(event.type) ?? [])]) if (l.capture === capture || phase === 2) l.fn(event);
    };
    for (const node of [...path].reverse()) {
      if (event.propagationStopped) break;
      run(node, true, node === this ? 2 : 1);
    }
    for (const node of path.slice(1)) {
      if (!event.bubbles || event.propagationStopped) break;
      run(node, false, 3);
    }
    event.currentTarget = null;
    return !event.defaultPrevented;
  }
}

export class DomText extends DomNode {
  constructor(
    public data: string,
    ownerDocument: DomDocument,
  ) {
    super(3, '#text', ownerDocument);
  }
  get nodeValue(): string {
    return this.data;
  }
  set nodeValue(text: string) {
    this.data = text;
  }
  override get textContent(): string {
    return this.data;
  }
  override set textContent(text: string) {
    this.data = text;
  }
}

export class DomElement extends DomNode {
  readonly namespaceURI = 'http://www.w3.org/1999/xhtml';
  readonly attributes = new Map<string, string>();
  readonly style: Record<string, string> & { setProperty(name: string, value: string): void } = Object.assign(Object.create(null), {
    setProperty(this: Record<string, string>, name: string, value: string) {
      this[name] = value;
    },
  });
  // Form controls: what React reads and writes on an <input>.
  value = '';
  defaultValue = '';
  checked = false;
  defaultChecked = false;
  type: string;
  name = '';

  constructor(tagName: string, ownerDocument: DomDocument) {
    super(1, tagName.toUpperCase(), ownerDocument);
    // A browser's <input> is a text input unless it says otherwise (react-dom's onChange looks at the type).
    this.type = this.nodeName === 'INPUT' ? 'text' : '';
  }
  get tagName(): string {
    return this.nodeName;
  }
  get localName(): string {
    return this.nodeName.toLowerCase();
  }
  setAttribute(name: string, value: string): void {
    this.attributes.set(name, String(value));
  }
  getAttribute(name: string): string | null {
    return this.attributes.get(name) ?? null;
  }
  hasAttribute(name: string): boolean {
    return this.attributes.has(name);
  }
  removeAttribute(name: string): void {
    this.attributes.delete(name);
  }
  /** The descendants with this tag name, in document order. */
  all(tagName: string): DomElement[] {
    const out: DomElement[] = [];
    const walk = (n: DomNode) => {
      for (const c of n.childNodes) {
        if (c instanceof DomElement && c.localName === tagName) out.push(c);
        walk(c);
      }
    };
    walk(this);
    return out;
  }
}

export class DomDocument extends DomNode {
  readonly documentElement: DomElement;
  readonly body: DomElement;
  activeElement: DomElement | null = null;
  defaultView: unknown = null;
  // react-dom checks `'oninput' in document` to know the input event is supported.
  oninput = null;

  constructor() {
    super(9, '#document', null);
    this.documentElement = this.appendChild(new DomElement('html', this));
    this.body = this.documentElement.appendChild(new DomElement('body', this));
    this.activeElement = this.body;
  }
  createElement(tagName: string): DomElement {
    return new DomElement(tagName, this);
  }
  createElementNS(_namespace: string, tagName: string): DomElement {
    return new DomElement(tagName, this);
  }
  createTextNode(text: string): DomText {
    return new DomText(text, this);
  }
}

/** Installs a document and a window as globals; the returned function removes them. */
export function installDom(): { document: DomDocument; uninstall(): void } {
  const document = new DomDocument();
  const window = {
    document,
    event: undefined,
    HTMLIFrameElement: class {},
    // Not the top window: react-dom's development build reads navigator (which Node 20 lacks) only in the top one.
    top: null,
    self: undefined as unknown,
    addEventListener() {},
    removeEventListener() {},
    getSelection: () => null,
  };
  window.self = window;
  document.defaultView = window;
  const g = globalThis as Record<string, unknown>;
  g.window = window;
  g.document = document;
  return {
    document,
    uninstall() {
      delete g.window;
      delete g.document;
    },
  };
}

/** What a user typing `text` into a controlled input does: the value changes, an `input` event bubbles. */
export function typeInto(input: DomElement, text: string): void {
  input.value = text;
  input.dispatchEvent(new DomEvent('input', { bubbles: true }));
}

/** Submitting a form (the Enter key in its input): a cancelable `submit` event that bubbles. */
export function submit(form: DomElement): void {
  form.dispatchEvent(new DomEvent('submit', { bubbles: true, cancelable: true }));
}
